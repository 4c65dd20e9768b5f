"""Renders the published figures from the committed results: python bench/report.py [--check]

README.md, bench/README.md and docs/*.md hold blocks

    <!-- report:begin NAME -->
    ...
    <!-- report:end -->

whose contents this script writes from bench/results/*.json (never by hand):
- ``headline``: per suite, op, direction and peer (with the peer's precision), the speedup (in the
  kernels suite the range over every dtype and shape measured, losers included; in the others each
  case), with the result file, machine, commit and date beside it;
- ``headline:STEM,STEM...``: the same for the suites named (the CUDA results, say);
- ``table:STEM``: every case of bench/results/STEM.json with the machine line and the ceilings;
- ``summary:STEM``: the end-to-end results that are not case tables (training, fine-tuning, serving
  throughput and load, the quantized engines side by side), rendered
  by the benchmark script that wrote them (its ``render(results)``).

``--check`` renders without writing and exits with status 1 if a block differs from what the
committed JSON gives (CI runs it, so a hand-edited or stale figure fails).
"""

import argparse
import glob
import json
import os
import re
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

from common import describe_ceilings, format_table, table_note  # noqa: E402

BLOCK = re.compile(r"(<!-- report:begin (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- report:end -->)", re.S)

# The suites whose results the headline summarizes, in order.
HEADLINE_STEMS = ["cpu-kernels", "cpu-modules", "cpu-generation"]

# Peers that are unusually slow in a precision, said beside the figure.
SLOW_PEERS = {
    ("rms_norm", "bf16"): "F.rms_norm's bf16 path is an unfused ATen composition",
}
# Suites whose rows are summarized as ranges over shapes; in the others every case is its own row.
RANGED_SUITES = {"kernels"}
# summary:STEM blocks: the bench script whose render(results) writes the block
SUMMARY_SCRIPTS = {"cpu-train-shakespeare": "train_shakespeare", "cpu-finetune-shakespeare": "finetune_shakespeare",
                   "cpu-serving-load": "bench_serving_load", "cpu-serving-load-": "bench_serving_load",
                   "cpu-serving-": "bench_serving",  # a key ending in "-" names every stem it begins
                   "cpu-quantized-peers": "bench_quantized_peers"}


def load(stem):
    path = os.path.join(RESULTS, stem + ".json")
    with open(path) as f:
        return json.load(f)


def source_line(stem, data):
    m = data["machine"]
    clean = {"yes": "clean tree", "no": "UNCOMMITTED changes",
             "copy of that commit": "a copy of that commit's tree"}.get(m.get("clean"), "tree state not recorded")
    return (f"`bench/results/{stem}.json`: {m.get('cpu', '?')}{', ' + m['gpu'] if m.get('gpu') else ''}, "
            f"{m.get('threads', '?')} threads, torch {m.get('torch', '?')}, BLAS {m.get('blas', '?')}, "
            f"commit {m.get('commit', '?')} ({clean}), {m.get('date', '?')}")


def _range(vals):
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"


def headline(stems=HEADLINE_STEMS):
    lines = ["| suite | op | direction | peer (its precision) | speedup | cases |", "|---|---|---|---|---|---|"]
    sources = []
    for stem in stems:
        if not os.path.exists(os.path.join(RESULTS, stem + ".json")):
            continue
        data = load(stem)
        sources.append(source_line(stem, data))
        suite = stem.split("-", 1)[1]
        ranged = bool(RANGED_SUITES & set(suite.split("-")))  # cpu-kernels, cuda-h200-kernels-quick
        if stem.startswith("cuda-"):
            suite = "cuda " + ("kernels" if ranged else suite.split("-", 1)[-1])
        groups = OrderedDict()
        for r in data["results"]:
            # kernels: one row per op, direction and peer, the range over every dtype and shape;
            # the end-to-end suites: one row per case
            key = (r["op"], r["direction"], r.get("peer", ""), r.get("note", "") if ranged else
                   (r["dtype"], r["shape"]))
            groups.setdefault(key, []).append(r)
        for (op, direction, peer, _), rs in groups.items():
            failed = [r for r in rs if r.get("failed")]
            ok = [r["speedup"] for r in rs if "speedup" in r]
            cell = _range(ok) if ok else ""
            if failed:
                cell += f" ({len(failed)} FAILED validation)"
            dtypes = list(OrderedDict.fromkeys(r["dtype"] for r in rs))
            peer_dtypes = list(OrderedDict.fromkeys(r.get("peer_dtype", r["dtype"]) for r in rs))
            notes = [SLOW_PEERS[(op, d)] for d in dtypes if (op, d) in SLOW_PEERS and stem.startswith("cpu-")]
            peer_cell = f"{peer} ({', '.join(peer_dtypes)})" + "".join(f"; {n}" for n in notes) if peer else ""
            what = f"{len(rs)}: {', '.join(dtypes)}" if ranged else f"{rs[0]['dtype']} {rs[0]['shape']}"
            lines.append(f"| {suite} | {op} | {direction} | {peer_cell} | {cell} | {what} |")
    return "\n".join(lines + [""] + [f"Source: {s}" for s in sources]) + "\n"


def table(stem):
    data = load(stem)
    return "\n".join([
        source_line(stem, data), "",
        "Ceilings measured in the same run: " + describe_ceilings(data.get("ceilings", {})), "",
        table_note(data.get("machine", {}), data["results"], data.get("ceilings")), "",
        format_table(data["results"]), "",
    ])


def summary(stem):
    import importlib

    data = load(stem)
    m = data["machine"]
    m.setdefault("clean", None)
    script = SUMMARY_SCRIPTS.get(stem) or next(v for k, v in SUMMARY_SCRIPTS.items() if k.endswith("-") and
                                                stem.startswith(k))
    return source_line(stem, data) + "\n\n" + importlib.import_module(script).render(data)


def render(name):
    if name == "headline":
        return headline()
    kind, _, arg = name.partition(":")
    if kind == "headline":
        return headline(arg.split(","))
    if kind == "table":
        return table(arg)
    if kind == "summary":
        return summary(arg)
    raise SystemExit(f"unknown report block {name!r}")


def documents():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(HERE, "*.md"))) + \
        sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def rendered(text):
    """``text`` with every report block rewritten from the committed results."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a rendered block differs; write nothing")
    ap.add_argument("documents", nargs="*", help="the files to render (default: README.md, bench/*.md, docs/*.md)")
    args = ap.parse_args(argv)
    stale = []
    for path in args.documents or documents():
        with open(path) as f:
            text = f.read()
        new = rendered(text)
        if new != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    if args.check:
        if stale:
            print("figures differ from bench/results/*.json (run python bench/report.py): " + ", ".join(stale))
            return 1
        print("report: every rendered block matches the committed results")
    elif stale:
        print("rewrote " + ", ".join(stale))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Summary of a GPU check run (scripts/gpu_check.sh): device, torch version, commit, the status and
time of each step, test counts, sanitizer results and the benchmark table, as Markdown and JSON.

    python scripts/gpu_summary.py --dir OUT [--results bench/results --slug h200]

Reads from OUT whatever the steps left there (every input is optional; a missing one reads as
"not run"): steps.tsv (step, exit code, seconds per line), info.txt (key: value lines),
junit.xml (pytest), memcheck.log / racecheck.log (compute-sanitizer), cuda-kernels.md (bench).
Writes OUT/summary.md and OUT/summary.json, and copies of both to RESULTS/cuda-SLUG-summary.{md,json}.
"""

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def step_status(rc):
    if rc == 0:
        return "ok"
    if rc in (124, 137):
        return "timed out"
    if rc == 125:
        return "skipped (no time left)"
    return f"failed (rc {rc})"


def parse_steps(text):
    steps = {}
    for line in (text or "").splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, rc, secs = parts
        try:
            rc_i, secs_f = int(rc), float(secs)
        except ValueError:
            continue
        steps[name] = {"rc": rc_i, "seconds": round(secs_f, 1), "status": step_status(rc_i)}
    return steps


def parse_info(text):
    info = {}
    for line in (text or "").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def parse_junit(text):
    if not text:
        return None
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tot = {"total": 0, "failed": 0, "errors": 0, "skipped": 0}
    for s in suites:
        tot["total"] += int(s.get("tests", 0))
        tot["failed"] += int(s.get("failures", 0))
        tot["errors"] += int(s.get("errors", 0))
        tot["skipped"] += int(s.get("skipped", 0))
    return {"total": tot["total"], "passed": tot["total"] - tot["failed"] - tot["errors"] - tot["skipped"],
            "failed": tot["failed"], "errors": tot["errors"], "skipped": tot["skipped"]}


def parse_sanitizer(text):
    if text is None:
        return "not run"
    m = re.search(r"ERROR SUMMARY: (\d+) errors?", text)
    if m:
        return f"{m.group(1)} errors"
    m = re.search(r"RACECHECK SUMMARY: (\d+ hazards? displayed[^\n]*)", text)
    if m:
        return m.group(1).strip()
    return "no summary (did not finish)"


def build(dirpath):
    steps = parse_steps(_read(os.path.join(dirpath, "steps.tsv")))
    info = parse_info(_read(os.path.join(dirpath, "info.txt")))
    tests = parse_junit(_read(os.path.join(dirpath, "junit.xml")))
    sanitizer = {t: parse_sanitizer(_read(os.path.join(dirpath, f"{t}.log"))) for t in ("memcheck", "racecheck")}
    bench = _read(os.path.join(dirpath, "cuda-kernels.md"))
    return {"info": info, "steps": steps, "tests": tests, "sanitizer": sanitizer, "bench_table": bench}


def markdown(s):
    lines = ["# fusedformer GPU check", ""]
    info = s["info"]
    for key in ("device", "driver", "torch", "cuda", "nvcc", "commit", "date"):
        lines.append(f"- {key}: {info.get(key, 'unknown')}")
    lines += ["", "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    if not s["steps"]:
        lines.append("| (none) | not run | |")
    for name, st in s["steps"].items():
        lines.append(f"| {name} | {st['status']} | {st['seconds']} |")
    lines += ["", "## Tests", ""]
    t = s["tests"]
    if t is None:
        lines.append("not run")
    else:
        lines.append(f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped "
                     f"(of {t['total']})")
    lines += ["", "## compute-sanitizer", ""]
    for tool, res in s["sanitizer"].items():
        lines.append(f"- {tool}: {res}")
    lines += ["", "## Benchmarks (bench/run.py --suite cuda)", ""]
    lines.append(s["bench_table"].strip() if s["bench_table"] else "not run")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="the GPU check's output folder")
    ap.add_argument("--results", default=None, help="also write cuda-SLUG-summary.{md,json} here (bench/results)")
    ap.add_argument("--slug", default="gpu", help="the GPU's name in file names (h200)")
    args = ap.parse_args(argv)
    s = build(args.dir)
    md = markdown(s)
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "summary.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in s.items() if k != "bench_table"}, f, indent=1)
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, f"cuda-{args.slug}-summary.md"), "w") as f:
            f.write(md)
        with open(os.path.join(args.results, f"cuda-{args.slug}-summary.json"), "w") as f:
            json.dump({k: v for k, v in s.items() if k != "bench_table"}, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

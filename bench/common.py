"""Benchmark plumbing: cases, timing, ceilings measured in the same run, and result files.

A bench module (bench/bench_<name>.py) exposes ``cases(device, quick) -> list[Case]``. run.py
validates each case's output first, then times ours and every peer (median of many repetitions),
and reports the ratio against the first peer, the achieved GB/s or GFLOP/s and the fraction of the
ceiling (copy bandwidth or matmul rate) measured in the same run.
"""

import ctypes
import ctypes.util
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.utils.benchmark as tbench

try:  # glibc's malloc_trim, to reset the heap between timed functions (see _reset_allocator)
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    _LIBC.malloc_trim
except (OSError, AttributeError, TypeError):
    _LIBC = None


@dataclasses.dataclass
class Case:
    op: str  # e.g. "softmax"
    direction: str  # "fwd", "bwd" or "fwd+bwd"
    dtype: str
    shape: str
    ours: Callable[[], object]
    peers: Dict[str, Callable[[], object]]  # the first one is the ratio's reference
    validate: Optional[Callable[[], None]] = None  # raises if ours is wrong
    bytes: Optional[int] = None  # fewest bytes the op must move (memory-bound ops)
    flops: Optional[float] = None  # floating-point operations (attention)
    large: bool = False  # outputs over ~24 MB: on the CPU the page-fault regime
    target: Optional[float] = None  # the speedup the project aims for against the first peer
    note: str = ""

    @property
    def name(self):
        return f"{self.op} {self.direction} {self.dtype} {self.shape}"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, quick: bool) -> float:
    """Median milliseconds per call, after warm-up."""
    fn()
    fn()
    if device == "cuda":
        import triton.testing  # available where CUDA benchmarks run

        return float(triton.testing.do_bench(fn, warmup=25 if quick else 100, rep=50 if quick else 400,
                                             return_mode="median"))
    t = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = t.blocked_autorange(min_run_time=0.05 if quick else 1.0)
    return m.median * 1e3


def measure_ceilings(device: str, quick: bool) -> Dict[str, float]:
    """Copy bandwidth (bytes read + written) and fp32 / bf16 matmul rate on this machine, now."""
    out = {}
    # copy: 16 MB on the CPU (inside the kernel-size regime), 1 GB on the GPU
    n = (4 << 20) if device == "cpu" else (256 << 20)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick)
    out["copy_GBps"] = 2 * n * 4 / ms / 1e6
    m = 1024 if device == "cpu" else 8192
    for dt in ([torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]):
        a = torch.randn(m, m, device=device, dtype=dt)
        b = torch.randn(m, m, device=device, dtype=dt)
        ms = time_ms(lambda: a @ b, device, quick)
        out[f"matmul_{str(dt).split('.')[-1]}_GFLOPs"] = 2 * m**3 / ms / 1e6
    return out


def machine_info(device: str) -> Dict[str, str]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "platform": platform.platform(),
    }
    try:
        import fusedformer

        info["fusedformer"] = fusedformer.__version__
        info["cpu_capability"] = fusedformer.cpu_capability()
    except Exception:  # pragma: no cover
        pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = cpu
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:
        pass
    return info


# Whether the heap is trimmed before every timed function or call (run.py --keep-heap turns it off).
TRIM_HEAP = True


def _reset_allocator(device: str) -> None:
    """Start every timed function from the same allocator state: the validation before it (float64
    references) and the function timed before it leave glibc's heap in a state (its dynamic mmap and
    trim thresholds) that decides whether the next function's ~25 MB outputs come from the heap or
    fresh from the OS with a page fault per 4 KB, which at these sizes costs more than the kernel.
    With ``TRIM_HEAP`` off, calls follow one another with the heap as the previous one left it, as
    in a training or inference loop (the steady state)."""
    gc.collect()
    if TRIM_HEAP and device == "cpu" and _LIBC is not None:
        _LIBC.malloc_trim(0)


# Calls at least this long (end-to-end cases) are timed in interleaved rounds.
_LONG_CALL_MS = 20.0


def _call_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_ms(fns: List[Callable[[], object]], quick: bool) -> List[float]:
    """Median milliseconds per call of each function, timed in rounds that call every function once,
    in alternating order (ABBA...). On a shared machine the speed drifts over seconds; a long call
    timed in one block per function would be compared with its peer's block taken at another speed.
    At least 5 rounds (3 with quick), more up to ~20 s of calls."""
    first = []
    for f in fns:
        _reset_allocator("cpu")
        first.append(_call_ms(f))
    per_round = sum(first) / 1e3
    rounds = 3 if quick else int(min(15, max(5, 20.0 / max(per_round, 1e-3))))
    times = [[] for _ in fns]
    for r in range(rounds):
        order = list(range(len(fns))) if r % 2 == 0 else list(reversed(range(len(fns))))
        for i in order:
            _reset_allocator("cpu")
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def run_case(case: Case, device: str, quick: bool, ceilings: Dict[str, float]) -> Dict[str, object]:
    res = {"op": case.op, "direction": case.direction, "dtype": case.dtype, "shape": case.shape,
           "large": case.large, "target": case.target, "note": case.note}
    if case.validate is not None:
        case.validate()
    res["validated"] = case.validate is not None
    res["peers_ms"] = {}
    if device == "cpu" and _call_ms(case.ours) >= _LONG_CALL_MS:
        times = interleaved_ms([case.ours, *case.peers.values()], quick)
        res["ours_ms"] = times[0]
        res["peers_ms"] = dict(zip(case.peers, times[1:]))
        res["timing"] = "interleaved rounds"
    else:
        _reset_allocator(device)
        res["ours_ms"] = time_ms(case.ours, device, quick)
        for k, f in case.peers.items():
            _reset_allocator(device)
            res["peers_ms"][k] = time_ms(f, device, quick)
    if case.peers:
        first = next(iter(case.peers))
        res["peer"] = first
        res["speedup"] = res["peers_ms"][first] / res["ours_ms"]
    if case.bytes:
        res["GBps"] = case.bytes / res["ours_ms"] / 1e6
        res["frac_copy"] = res["GBps"] / ceilings["copy_GBps"]
    if case.flops:
        res["GFLOPs"] = case.flops / res["ours_ms"] / 1e6
        key = "matmul_float32_GFLOPs" if case.dtype == "fp32" or device == "cpu" else "matmul_bfloat16_GFLOPs"
        res["frac_matmul"] = res["GFLOPs"] / ceilings[key]
    if case.target is not None and "speedup" in res:
        res["meets_target"] = res["speedup"] >= case.target
    return res


def _fmt(v, spec, suffix=""):
    return "" if v is None else format(v, spec) + suffix


def format_table(results: List[Dict[str, object]]) -> str:
    cols = ["op", "dir", "dtype", "shape", "ours ms", "peer", "peer ms", "speedup", "target", "GB/s", "GFLOP/s",
            "% of ceiling"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        peer = r.get("peer", "")
        frac = r.get("frac_copy", r.get("frac_matmul"))
        tgt = r.get("target")
        target = "" if tgt is None else ">= %.1fx %s" % (tgt, "ok" if r.get("meets_target") else "MISS")
        row = [
            r["op"], r["direction"], r["dtype"], r["shape"] + (" (large)" if r["large"] else ""),
            _fmt(r["ours_ms"], ".3f"), peer, _fmt(r["peers_ms"].get(peer) if peer else None, ".3f"),
            _fmt(r.get("speedup"), ".2f", "x"), target, _fmt(r.get("GBps"), ".1f"), _fmt(r.get("GFLOPs"), ".1f"),
            _fmt(None if frac is None else 100 * frac, ".0f", "%"),
        ]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_results(results, ceilings, info, out_dir: str, stem: str, title: str):
    os.makedirs(out_dir, exist_ok=True)
    payload = {"machine": info, "ceilings": ceilings, "results": results}
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    md = [f"# {title}", ""]
    md.append(", ".join(f"{k}: {v}" for k, v in info.items()))
    md.append("")
    md.append("Ceilings measured in the same run: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    md.append("")
    md.append("Medians; speedup = peer time / our time (higher is better); % of ceiling is GB/s against the "
              "copy bandwidth (memory-bound ops) or GFLOP/s against the matmul rate (attention). Cases whose "
              "call takes 20 ms or more (end-to-end) are timed in interleaved rounds, ours and the peers "
              "alternating, 5-15 rounds.")
    md.append("")
    md.append(format_table(results))
    md.append("")
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(md))
    _plot(results, out_dir, stem)


def _plot(results, out_dir, stem):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    ops = sorted({r["op"] for r in results})
    for op in ops:
        rs = [r for r in results if r["op"] == op and "speedup" in r]
        if not rs:
            continue
        labels = [f"{r['direction']} {r['dtype']}\n{r['shape']}" for r in rs]
        vals = [r["speedup"] for r in rs]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rs)), 4))
        colors = ["tab:green" if v >= (r.get("target") or 1.0) else "tab:red" for v, r in zip(vals, rs)]
        ax.bar(range(len(rs)), vals, color=colors)
        ax.axhline(1.0, color="black", lw=0.8)
        for i, r in enumerate(rs):
            if r.get("target"):
                ax.plot([i - 0.4, i + 0.4], [r["target"]] * 2, color="tab:blue", lw=1.5)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(f"speedup vs {rs[0].get('peer', 'peer')}")
        ax.set_title(f"{op} ({stem}); blue: target")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{stem}-{op}.png"), dpi=100)
        plt.close(fig)


def now():
    return time.time()

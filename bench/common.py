"""Benchmark plumbing: cases, validation, timing, ceilings measured in the same run, result files.

A bench module (bench/bench_<op>.py, or a suite such as bench_modules.py) exposes
``cases(device, quick) -> list[Case]``. run.py validates each case first (a case without a check,
or whose check fails, is reported as failed and not timed), then times ours and every peer and
reports the ratio against the first peer with the spread of both timings, the achieved GB/s or
GFLOP/s, and the fraction of a ceiling measured in the same run: the best of several streaming
methods at the case's size for memory-bound ops, the matmul rate for compute-bound ones.
"""

import ctypes
import ctypes.util
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Tuple

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
    validate: Optional[Callable[[], None]] = None  # raises if ours is wrong; required
    bytes: Optional[int] = None  # fewest bytes the op must move (memory-bound ops)
    flops: Optional[float] = None  # floating-point operations (attention, products)
    large: bool = False  # outputs over ~24 MB: on the CPU the page-fault regime
    target: Optional[float] = None  # the speedup the project aims for against the first peer
    copy_target: Optional[float] = None  # the fraction of the copy bandwidth (same bytes) aimed for
    note: str = ""
    peer_dtype: Optional[str] = None  # the first peer's precision where it differs from ``dtype``

    @property
    def name(self):
        return f"{self.op} {self.direction} {self.dtype} {self.shape}"


# ---------------------------------------------------------------------------------------------
# validation helpers: float64 references, and DESIGN.md's rule for low precision

def _as_list(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


def max_error(got, want) -> float:
    """Largest absolute difference over one or several tensors (NaN counts as infinite)."""
    worst = 0.0
    for a, b in zip(_as_list(got), _as_list(want)):
        d = (a.detach().double().cpu() - b.detach().double().cpu()).abs()
        if d.numel() and not torch.isfinite(d).all():
            return math.inf
        worst = max(worst, d.max().item() if d.numel() else 0.0)
    return worst


def check_close(got, want, tol: float, what: str = "output") -> None:
    """Every tensor of ``got`` within ``tol`` (absolute and relative) of ``want``; NaN never passes."""
    got, want = _as_list(got), _as_list(want)
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} tensors, expected {len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            raise AssertionError(f"{what}[{i}]: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            raise AssertionError(f"{what}[{i}]: not finite")
        bad = (a - b).abs() > tol + tol * b.abs()
        if bad.any():
            raise AssertionError(f"{what}[{i}]: max abs difference {(a - b).abs().max().item():.3e} "
                                 f"(tolerance {tol:g} abs + rel)")


def check_vs_peer(got, peer, want, atol: float, what: str = "output") -> None:
    """The low-precision rule: our error against the float64 reference at most twice the peer's own
    error at that precision, plus ``atol``."""
    ours_err, peer_err = max_error(got, want), max_error(peer, want)
    if not ours_err <= 2 * peer_err + atol:
        raise AssertionError(f"{what}: error {ours_err:.3e} > 2 x the peer's {peer_err:.3e} + {atol:g}")


def near_greedy(model, seq, prompt: int, tol: float, what: str) -> None:
    """Every token of ``seq`` (B, T) after the first ``prompt`` has a logit within ``tol`` of the best
    that ``model`` (run over the whole sequence, without a KV cache) gives at its position."""
    with torch.no_grad():
        full = model(seq).float()
    for b in range(seq.shape[0]):
        for pos in range(prompt, seq.shape[1]):
            row = full[b, pos - 1]
            if row[seq[b, pos]] < row.max() - tol:
                raise AssertionError(f"{what}: token at ({b}, {pos}) has logit {row[seq[b, pos]]:.4f}, "
                                     f"the best is {row.max():.4f} (tolerance {tol:.4f})")


def check_result(got, peer, want, dtype: torch.dtype, tol: float = 1e-4, atol: float = 1e-2,
                 what: str = "output") -> None:
    """float32 / float64: ``got`` within ``tol`` of the float64 reference ``want``; lower precision:
    :func:`check_vs_peer` (twice the peer's error at that precision, plus ``atol``)."""
    if dtype in (torch.float32, torch.float64):
        check_close(got, want, tol, what)
    else:
        check_vs_peer(got, peer, want, atol, what)


def grads(fn: Callable[..., torch.Tensor], inputs, grad_out, dtype=None):
    """Gradients of ``fn(*inputs)`` against ``grad_out`` for every input, in ``dtype`` (the inputs'
    own by default): float64 copies give the reference of a backward."""
    xs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*xs)
    return torch.autograd.grad(out, xs, grad_out.to(out.dtype))


# ---------------------------------------------------------------------------------------------
# timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _quartiles(xs: List[float]) -> Tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


LAST_CUDA_TIMING = ""  # how time_ms timed its last CUDA call: "graph" (replays) or "launched"


def time_ms(fn: Callable[[], object], device: str, quick: bool) -> Tuple[float, float]:
    """Median milliseconds per call after warm-up, and the interquartile range of the measurements."""
    fn()
    fn()
    if device == "cuda":
        import triton.testing  # available where CUDA benchmarks run

        global LAST_CUDA_TIMING
        # replays of a CUDA graph of the calls: the GPU's time, without the host's launch overhead
        # (a Python-level autograd function costs tens of microseconds per call, more than a fast
        # kernel); a call that cannot be captured is timed as launched
        try:
            q = triton.testing.do_bench_cudagraph(fn, rep=50 if quick else 200, quantiles=[0.25, 0.5, 0.75])
            LAST_CUDA_TIMING = "graph"
        except Exception:
            torch.cuda.synchronize()
            q = triton.testing.do_bench(fn, warmup=25 if quick else 100, rep=50 if quick else 400,
                                        quantiles=[0.25, 0.5, 0.75])
            LAST_CUDA_TIMING = "launched"
        return float(q[1]), float(q[2] - q[0])
    t = tbench.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = t.blocked_autorange(min_run_time=0.05 if quick else 1.0)
    return m.median * 1e3, m.iqr * 1e3


def _stream_rates(nbytes: int, device: str, quick: bool) -> Dict[str, float]:
    """GB/s of four streaming methods moving ``nbytes`` per call: a copy (half read, half written),
    a fill (written only: glibc's memset, non-temporal stores at these sizes), a sum (read only) and
    an add (c = a + b: two thirds read, one third written, STREAM's add, the traffic of a backward
    that reads two tensors and writes a third; three buffers, so that its working set is the bytes it
    moves, as for the other methods and the cases)."""
    n = max(1, nbytes // 8)  # floats per buffer of the copy: n read + n written
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    big = torch.randn(2 * n, device=device)  # the fill and the sum touch 2n floats, as many bytes
    n3 = max(1, nbytes // 12)  # the add: 2 x n3 floats read, n3 written
    a, b, c = (torch.randn(n3, device=device) for _ in range(3))
    rates = {}
    for name, fn, moved in (("copy", lambda: dst.copy_(src), 8 * n), ("fill", lambda: big.fill_(1.0), 8 * n),
                            ("sum", lambda: big.sum(), 8 * n), ("add", lambda: torch.add(a, b, out=c), 12 * n3)):
        ms, _ = time_ms(fn, device, quick)
        rates[name] = moved / ms / 1e6
    return rates


def _matmul_rates(dt, device: str, quick: bool) -> Dict[str, float]:
    """GFLOP/s of torch's product (and, in float32, the op's own blocked product) on squares and, on
    the CPU, the rectangle of a transformer MLP's product (4096 rows, 3072 x 768), the shape of the
    linear cases, which blocks differently from a square."""
    import fusedformer  # noqa: F401  (registers torch.ops.fusedformer)

    sizes = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 3072, 768)) if device == "cpu" else ((8192, 8192, 8192),)
    rates = {}
    for m, k, n in sizes:
        a = torch.randn(m, k, device=device, dtype=dt)
        b = torch.randn(k, n, device=device, dtype=dt)
        bt = b.t()  # the op's weight layout: (n, k), B read through its strides
        methods = [("torch.matmul", lambda: a @ b)]
        if dt == torch.float32:  # the op's blocked product is float32
            methods.append(("fusedformer.linear", lambda: torch.ops.fusedformer.linear(a, bt, None)))
        shape = f"{m}^3" if m == k == n else f"{m}x{k}x{n}"
        for name, f in methods:
            rates[f"{name} {shape}"] = 2 * m * k * n / time_ms(f, device, quick)[0] / 1e6
    return rates


def _set_matmul_ceiling(out: Dict[str, object], key: str, rates: Dict[str, float]):
    """Record the best of ``rates`` under ``matmul_KEY_*``, keeping a better earlier measurement."""
    best = max(rates, key=rates.get)
    if rates[best] > out.get(f"matmul_{key}_GFLOPs", 0.0):
        out[f"matmul_{key}_GFLOPs"] = rates[best]
        out[f"matmul_{key}_method"] = best


def measure_ceilings(device: str, quick: bool) -> Dict[str, object]:
    """The fp32 / bf16 matmul rate on this machine, now: the best of torch's product and the op's
    own blocked product (which beats a BLAS that takes a generic path on this CPU) at a few shapes, so
    that no product measured against it can exceed it (a case that does has it measured again, see
    :func:`matmul_ceiling`). The streaming ceilings are measured per working-set size as cases need
    them (:func:`stream_ceiling`)."""
    out: Dict[str, object] = {"stream": {}}
    for dt in (torch.float32, torch.bfloat16):
        _set_matmul_ceiling(out, str(dt).split(".")[-1], _matmul_rates(dt, device, quick))
    return out


# Times a ceiling is measured again, at most, when a case beats it: a shared machine's speed drifts,
# and a ceiling caught in a slow moment is no ceiling. The best measurement counts.
_REMEASURE = 2


def _remeasure(beaten: Callable[[], bool], measure: Callable[[], None]) -> None:
    """``measure()`` a ceiling again while ``beaten()`` (a case is above it), at most ``_REMEASURE``
    times."""
    for _ in range(_REMEASURE):
        if not beaten():
            break
        measure()


def _matmul_key(dtype: str) -> str:
    return "float32" if dtype == "fp32" else "bfloat16"


def matmul_ceiling(ceilings: Dict[str, object], dtype: str, gflops: float, device: str, quick: bool) -> Tuple[float, str]:
    """The matmul ceiling for a case of ``dtype`` ("fp32" or "bf16") that reached ``gflops``:
    measured again (up to twice) while the case is above it. Returns (GFLOP/s, method)."""
    key = _matmul_key(dtype)

    def measure():
        _set_matmul_ceiling(ceilings, key, _matmul_rates(getattr(torch, key), device, quick))
        ceilings[f"matmul_{key}_measurements"] = ceilings.get(f"matmul_{key}_measurements", 1) + 1

    _remeasure(lambda: gflops > ceilings[f"matmul_{key}_GFLOPs"], measure)
    return ceilings[f"matmul_{key}_GFLOPs"], ceilings.get(f"matmul_{key}_method", key + " matmul")


def _stream_mb(nbytes: int) -> str:
    return str(max(1, round(nbytes / 2**20)))


def stream_ceiling(ceilings: Dict[str, object], nbytes: int, device: str, quick: bool,
                   gbps: float = 0.0) -> Tuple[float, str]:
    """The streaming ceiling for a working set of ``nbytes`` (rounded to the MB), measured the first
    time a case of that size asks for it: the best of a copy, a fill, a read-only sum and an add
    moving as many bytes. A working set that fits a cache streams faster than one that does not, and
    the same size sees the same caches. A case that reached ``gbps`` above it has it measured again
    (up to twice; each method keeps its best). Returns (GB/s, 'method at N MB')."""
    mb = _stream_mb(nbytes)
    stream = ceilings["stream"]

    def measure():
        old = stream.get(mb, {"all": {}})
        rates = {k: max(v, old["all"].get(k, 0.0)) for k, v in _stream_rates(int(mb) << 20, device, quick).items()}
        best = max(rates, key=rates.get)
        stream[mb] = {"GBps": rates[best], "method": best, "all": rates}
        if "GBps" in old:
            stream[mb]["measurements"] = old.get("measurements", 1) + 1

    if mb not in stream:
        measure()
    _remeasure(lambda: gbps > stream[mb]["GBps"], measure)
    c = stream[mb]
    return c["GBps"], f"{c['method']} {mb} MB"


def apply_ceilings(r: Dict[str, object], ceilings: Dict[str, object]) -> None:
    """A result's fractions against the ceilings' current values: of its working set's streaming
    ceiling and of the copy there (``frac_copy``) for a case that moves bytes, of the matmul ceiling
    of its dtype for one that computes products (which then names the ceiling), and whether it meets
    its targets (speedup over the peer, fraction of the copy)."""
    mb = r.get("stream_mb")
    if r.get("GBps") is not None and mb in ceilings.get("stream", {}):
        c = ceilings["stream"][mb]
        r["frac_ceiling"], r["ceiling"] = r["GBps"] / c["GBps"], f"{c['method']} {mb} MB"
        r["frac_copy"] = r["GBps"] / c["all"]["copy"]
    key = _matmul_key(r.get("dtype"))
    if r.get("GFLOPs") is not None and f"matmul_{key}_GFLOPs" in ceilings:
        r["frac_ceiling"] = r["GFLOPs"] / ceilings[f"matmul_{key}_GFLOPs"]
        r["ceiling"] = ceilings.get(f"matmul_{key}_method", key + " matmul")
    meets = []
    if r.get("target") is not None and "speedup" in r:
        meets.append(r["speedup"] >= r["target"])
    if r.get("copy_target") is not None and "frac_copy" in r:
        meets.append(r["frac_copy"] >= r["copy_target"])
    if meets:
        r["meets_target"] = all(meets)


def _git(*args) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()


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
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == platform.processor():
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    extra = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    info["cpu"] = cpu + (f" ({', '.join(extra)})" if extra else "")
    info["blas"] = "MKL" if torch.backends.mkl.is_available() else "other"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if os.environ.get("FUSEDFORMER_SOURCE_COMMIT"):
        # a copy of a committed tree without its repository (scripts/gpu_check.sh --commit)
        info["commit"], info["clean"] = os.environ["FUSEDFORMER_SOURCE_COMMIT"], "copy of that commit"
        return info
    try:
        info["commit"] = _git("rev-parse", "--short", "HEAD")
        # tracked files only: a result is reproducible from its commit when nothing tracked differs but
        # the results themselves (a suite run before this one rewrites bench/results/)
        info["clean"] = "yes" if not _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                          ":(top,exclude)bench/results") else "no"
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


def interleaved_ms(fns: List[Callable[[], object]], quick: bool) -> List[Tuple[float, float]]:
    """(median, interquartile range) of the milliseconds per call of each function, timed in rounds
    that call every function once, in alternating order (ABBA...). On a shared machine the speed
    drifts over seconds; a long call timed in one block per function would be compared with its
    peer's block taken at another speed. At least 5 rounds (3 with quick), more up to ~20 s of calls."""
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
    out = []
    for t in times:
        lo, med, hi = _quartiles(t)
        out.append((med, hi - lo))
    return out


def run_case(case: Case, device: str, quick: bool, ceilings: Dict[str, object]) -> Dict[str, object]:
    res = {"op": case.op, "direction": case.direction, "dtype": case.dtype, "shape": case.shape,
           "large": case.large, "target": case.target, "note": case.note,
           "peer_dtype": case.peer_dtype or case.dtype}
    try:
        if case.validate is None:
            raise AssertionError("the case has no validation")
        case.validate()
    except Exception as e:  # reported, not timed
        res["validated"] = False
        res["failed"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return res
    res["validated"] = True
    res["peers_ms"], res["peers_iqr_ms"] = {}, {}
    if device == "cpu" and _call_ms(case.ours) >= _LONG_CALL_MS:
        times = interleaved_ms([case.ours, *case.peers.values()], quick)
        res["ours_ms"], res["ours_iqr_ms"] = times[0]
        for k, (med, iqr) in zip(case.peers, times[1:]):
            res["peers_ms"][k], res["peers_iqr_ms"][k] = med, iqr
        res["timing"] = "interleaved rounds"
    else:
        _reset_allocator(device)
        res["ours_ms"], res["ours_iqr_ms"] = time_ms(case.ours, device, quick)
        kinds = [LAST_CUDA_TIMING]
        for k, f in case.peers.items():
            _reset_allocator(device)
            res["peers_ms"][k], res["peers_iqr_ms"][k] = time_ms(f, device, quick)
            kinds.append(LAST_CUDA_TIMING)
        # on the GPU: "graph" when every function was timed by graph replays, else each one's way
        res["timing"] = "blocked" if device != "cuda" else kinds[0] if len(set(kinds)) == 1 else "/".join(kinds)
    if case.peers:
        first = next(iter(case.peers))
        res["peer"] = first
        res["speedup"] = res["peers_ms"][first] / res["ours_ms"]
    if case.bytes:
        res["GBps"], res["stream_mb"] = case.bytes / res["ours_ms"] / 1e6, _stream_mb(case.bytes)
        stream_ceiling(ceilings, case.bytes, device, quick, res["GBps"])
        if case.copy_target is not None:
            res["copy_target"] = case.copy_target
    if case.flops:
        res["GFLOPs"] = case.flops / res["ours_ms"] / 1e6
        matmul_ceiling(ceilings, case.dtype, res["GFLOPs"], device, quick)
    apply_ceilings(res, ceilings)
    return res


# ---------------------------------------------------------------------------------------------
# tables and files

def _fmt(v, spec, suffix=""):
    return "" if v is None else format(v, spec) + suffix


def _ms(ms, iqr):
    if ms is None:
        return ""
    spread = "" if not iqr or not ms else f" ±{50 * iqr / ms:.0f}%"
    return f"{ms:.3f}{spread}"


COLUMNS = ["op", "dir", "dtype", "shape", "ours ms", "peer", "peer ms", "speedup", "target", "GB/s", "GFLOP/s",
           "% of ceiling"]


def table_row(r: Dict[str, object]) -> List[str]:
    shape = r["shape"] + (" (large)" if r.get("large") else "")
    if r.get("failed"):
        return [r["op"], r["direction"], r["dtype"], shape, "FAILED validation: " + r["failed"].replace("|", "/"),
                "", "", "", "", "", "", ""]
    peer = r.get("peer", "")
    others = [f"{k} {_ms(v, r.get('peers_iqr_ms', {}).get(k))} ms ({v / r['ours_ms']:.2f}x)"
              for k, v in r["peers_ms"].items() if k != peer]
    tgt = r.get("target")
    target = "" if tgt is None else ">= %.1fx %s" % (tgt, "ok" if r.get("meets_target") else "MISS")
    if r.get("copy_target") is not None:
        target = "%s>= %.0f%% of copy: %.0f%% %s" % (target + "; " if target else "", 100 * r["copy_target"],
                                                   100 * r["frac_copy"], "ok" if r.get("meets_target") else "MISS")
    frac = r.get("frac_ceiling", r.get("frac_matmul"))
    ceiling = "" if frac is None else f"{100 * frac:.0f}%" + (f" ({r['ceiling']})" if r.get("ceiling") else "")
    return [
        r["op"], r["direction"], r["dtype"], shape,
        _ms(r.get("ours_ms"), r.get("ours_iqr_ms")) + (" (launched)" if "launched" in r.get("timing", "") else ""),
        peer + "".join(f"; also {o}" for o in others),
        _ms(r["peers_ms"].get(peer), r.get("peers_iqr_ms", {}).get(peer)) if peer else "",
        _fmt(r.get("speedup"), ".2f", "x"), target, _fmt(r.get("GBps"), ".1f"), _fmt(r.get("GFLOPs"), ".1f"),
        ceiling,
    ]


def format_table(results: List[Dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(str(c) for c in table_row(r)) + " |")
    return "\n".join(lines)


def describe_ceilings(ceilings: Dict[str, object]) -> str:
    parts = []
    for mb, c in sorted(ceilings.get("stream", {}).items(), key=lambda kv: int(kv[0])):
        others = ", ".join(f"{k} {v:.1f}" for k, v in c["all"].items())
        parts.append(f"stream {mb} MB: {c['GBps']:.1f} GB/s ({c['method']}; {others})")
    parts += [f"{k.replace('_GFLOPs', '')} {v:.1f} GFLOP/s ({ceilings.get(k.replace('GFLOPs', 'method'), '')})"
              for k, v in ceilings.items() if k.endswith("GFLOPs")]
    if "copy_GBps" in ceilings:
        parts.append(f"copy {ceilings['copy_GBps']:.1f} GB/s")
    return "; ".join(parts)


TABLE_NOTE = ("Medians, ± half the interquartile range of the timings; speedup = peer time / our time (higher is "
              "better). % of ceiling: GB/s against the best streaming method ({methods}) "
              "moving as many bytes as the case, measured in the same run, or GFLOP/s against the best "
              "matmul measured in the same run. Calls of 20 ms or more are timed in interleaved rounds, ours "
              "and the peers alternating.")
_STREAM_WORDS = {"copy": "copy", "fill": "fill", "sum": "read-only sum", "add": "add (c = a + b)"}


CUDA_NOTE = (" On the GPU each function (and each ceiling) is timed as replays of a CUDA graph of its calls: the "
             "GPU's time without the host's launch overhead; a call that could not be captured is timed as "
             "launched and marked so. '>= N% of copy': GB/s against the device-to-device copy of as many bytes.")
CUDA_LAUNCHED_NOTE = (" On the GPU each function is timed as launched (triton's do_bench, CUDA events): the host's "
                      "launch overhead is included where it exceeds the GPU's time. '>= N% of copy': GB/s against "
                      "the device-to-device copy of as many bytes.")


def table_note(info, results, ceilings=None) -> str:
    """The note above a table: how it was timed (on the GPU: graph replays, or as launched by
    results that predate graph timing) and the streaming methods its ceilings were measured with."""
    methods = []
    for c in ((ceilings or {}).get("stream") or {}).values():
        methods += [m for m in c.get("all", {}) if m not in methods]
    words = [_STREAM_WORDS.get(m, m) for m in methods or ("copy", "fill", "sum")]
    note = TABLE_NOTE.format(methods=", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0])
    if "gpu" not in info:
        return note
    graphs = any(r.get("timing") in ("graph", "launched") or "/" in r.get("timing", "") for r in results)
    return note + (CUDA_NOTE if graphs else CUDA_LAUNCHED_NOTE)


def write_results(results, ceilings, info, out_dir: str, stem: str, title: str):
    os.makedirs(out_dir, exist_ok=True)
    for r in results:  # a ceiling measured again for a later case holds for the earlier ones too
        apply_ceilings(r, ceilings)
    payload = {"title": title, "machine": info, "ceilings": ceilings, "results": results}
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    md = [f"# {title}", "", ", ".join(f"{k}: {v}" for k, v in info.items()), "",
          "Ceilings measured in the same run: " + describe_ceilings(ceilings), "",
          table_note(info, results, ceilings), "",
          format_table(results), ""]
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

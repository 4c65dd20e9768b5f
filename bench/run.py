"""Benchmarks: python bench/run.py [--quick] [--suite kernels|modules|generation|all] [--device cpu|cuda]
[--ops softmax,layer_norm,...] [--keep-heap]

Each case's result (forward and backward) is checked first; a case that fails its check, or has none,
is reported as failed, not timed, and the run exits with status 1. Then it is timed against its peers
in the same run. Results
go to bench/results/<device>-<suite>.{json,md} with one plot per op (with --quick, to
build/bench-quick/ so that committed figures are not overwritten). On the CPU the heap is trimmed
(malloc_trim) before every timed call, so that each starts from the same allocator state; with
--keep-heap it is not, and calls see the heap the previous one left, as in a loop.
"""

import argparse
import importlib
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
from common import describe_ceilings, format_table, machine_info, measure_ceilings, run_case, write_results  # noqa: E402

# suite -> bench modules, each exposing cases(device, quick) -> list[Case]
SUITES = {
    "kernels": ["bench_softmax", "bench_cross_entropy", "bench_layernorm", "bench_gelu", "bench_attention",
                "bench_linear", "bench_paged_attention", "bench_quantized_linear", "bench_cuda"],
    "cuda": ["bench_cuda"],  # the GPU targets alone (scripts/gpu_check.sh)
    "modules": ["bench_modules"],
    "generation": ["bench_generation"],
    "train": ["bench_train"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few sizes, short timings (a smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", default="", help="comma-separated op names to run (default: all)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results, or build/bench-quick)")
    ap.add_argument("--suite", default="all", help="kernels, cuda, modules, generation, train or all (default)")
    ap.add_argument("--stem", default=None, help="file name stem (default <device>-<suite>)")
    ap.add_argument("--keep-heap", action="store_true",
                    help="do not trim the heap (malloc_trim) before each timed call: the steady state of a loop")
    args = ap.parse_args(argv)
    common.TRIM_HEAP = not args.keep_heap

    import fusedformer  # noqa: F401  (registers the ops)

    out = args.out or (os.path.join(HERE, "..", "build", "bench-quick") if args.quick else os.path.join(HERE, "results"))
    wanted = {s.strip() for s in args.ops.split(",") if s.strip()}
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    info = machine_info(args.device)
    if args.device == "cpu":
        info["heap"] = "kept between calls" if args.keep_heap else "trimmed before each timed call"
    print(", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    ceilings = measure_ceilings(args.device, args.quick)
    print("ceilings: " + describe_ceilings(ceilings), flush=True)
    failed = []
    for suite in suites:
        results = []
        for modname in SUITES[suite]:
            if not os.path.exists(os.path.join(HERE, modname + ".py")):
                continue
            mod = importlib.import_module(modname)
            for case in mod.cases(args.device, args.quick):
                if wanted and case.op not in wanted:
                    continue
                r = run_case(case, args.device, args.quick, ceilings)
                results.append(r)
                if r.get("failed"):
                    failed.append(f"{case.name}: {r['failed']}")
                print(format_table([r]).splitlines()[-1], flush=True)
        if not results:
            continue
        stem = args.stem or f"{args.device}-{suite}"
        print()
        print(format_table(results))
        write_results(results, ceilings, info, out, stem, f"fusedformer {suite} benchmarks ({args.device})")
        print(f"\nwrote {os.path.normpath(out)}/{stem}.json, .md and plots\n")
    if failed:
        print(f"{len(failed)} case(s) failed validation and were not timed:\n  " + "\n  ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m fusedformer <command>: demo, info, bench (more commands register in COMMANDS)."""

import argparse
import os
import subprocess
import sys


def _info(args):
    import torch

    import fusedformer

    print(f"fusedformer {fusedformer.__version__} on torch {torch.__version__}")
    print(f"CPU kernels: {fusedformer.cpu_capability()} (available: {', '.join(fusedformer.available_cpu_capabilities())}),"
          f" {torch.get_num_threads()} threads")
    print(f"CUDA kernels built: {fusedformer.built_with_cuda()}; CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def _demo(args):
    from . import demo

    demo.run(batch=args.batch, seq=args.seq, reps=args.reps)
    return 0


def _bench(args):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "bench", "run.py")
    if not os.path.exists(script):
        print("fusedformer bench: bench/run.py is part of the source tree; run it from a checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script] + args.rest)


def _add_demo(sub):
    p = sub.add_parser("demo", help="encoder block from the fused ops vs plain PyTorch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=5)
    p.set_defaults(func=_demo)


def _add_info(sub):
    sub.add_parser("info", help="build and machine facts").set_defaults(func=_info)


def _add_bench(sub):
    p = sub.add_parser("bench", help="run the microbenchmarks (bench/run.py) from a source checkout")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)


# name -> function adding the subcommand's parser
COMMANDS = {"demo": _add_demo, "info": _add_info, "bench": _add_bench}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fusedformer", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    args = ap.parse_args(argv)
    return args.func(args)

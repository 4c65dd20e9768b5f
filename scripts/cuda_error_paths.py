"""Bad input on a device: each case runs in its own child process and must end in the named Python
exception, never in a signal (a crash). Prints one line per case and exits 1 if any case crashed or
raised something else. The GPU check runs it on CUDA; `--device cpu` runs the same cases on the CPU.

    python scripts/cuda_error_paths.py [--device cuda|cpu] [--cases NAME,NAME]
"""

import argparse
import subprocess
import sys

# name -> (code run with `torch`, `fusedformer`, `ops` (fusedformer.ops), `raw` (torch.ops.fusedformer)
# and `t(*shape, dtype=...)` (a random tensor on the device) in scope, the exception expected)
CASES = {
    "layer_norm normalized_shape": ("ops.layer_norm(t(1, 2, 8, 16), [7])", "ValueError"),
    "rms_norm weight shape": ("ops.rms_norm(t(4, 8), 8, t(7))", "ValueError"),
    "softmax mask shape": ("ops.softmax(t(2, 3), mask=t(4, 5))", "ValueError"),
    "linear in_features": ("raw.linear(t(2, 7), t(3, 8), None)", "ValueError"),
    "linear weight dtype": ("raw.linear(t(2, 8), t(3, 8, dtype=torch.float64), None)", "TypeError"),
    "attention dtype": ("ops.attention(t(1, 2, 8, 16), t(1, 2, 8, 16, dtype=torch.float16), "
                        "t(1, 2, 8, 16, dtype=torch.float16))", "TypeError"),
    "attention head dim": ("ops.attention(t(1, 2, 8, 16), t(1, 2, 8, 8), t(1, 2, 8, 16))", "ValueError"),
    "gelu approximate": ("raw.gelu(t(4), 'cubic')", "ValueError"),
    "cross_entropy target shape": (
        "raw.cross_entropy_rows(t(4, 10), torch.zeros(3, dtype=torch.long, device=dev), "
        "torch.tensor(1.0, device=dev), -100, True)", "ValueError"),
    "quantized_linear scale shape": (
        "raw.quantized_linear(t(2, 64), torch.zeros(8, 64, dtype=torch.int8, device=dev), t(7), None, 'int8')",
        "ValueError"),
    "paged_attention tables": (
        "raw.paged_attention(t(1, 2, 8), t(4, 2, 4, 8), t(4, 2, 4, 8), torch.zeros(1, 2, 2, dtype=torch.long, "
        "device=dev), torch.tensor([5], device=dev), torch.tensor([0, 1], device=dev), 0.3)", "ValueError"),
}

CHILD = """
import sys, torch, fusedformer
dev = sys.argv[1]
ops, raw = fusedformer.ops, torch.ops.fusedformer
def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype).to(dev)
try:
    exec(sys.argv[2])
except Exception as e:
    print(type(e).__name__ + ": " + str(e).splitlines()[0][:160])
else:
    print("no exception")
"""


def run(name, code, want, device):
    p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, device, code], capture_output=True,
                       text=True, timeout=120)
    if p.returncode != 0:
        tail = (p.stderr or "").strip().splitlines()[-3:]
        return False, f"CRASH (exit {p.returncode}): " + " | ".join(tail)
    got = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "no output"
    return got.startswith(want + ":"), got


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    bad = 0
    for name in names:
        code, want = CASES[name]
        ok, got = run(name, code, want, args.device)
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: expected {want}; {got}", flush=True)
    print(f"{len(names) - bad} of {len(names)} error paths raised the expected exception on {args.device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs every CUDA kernel of fusedformer once on small inputs (for compute-sanitizer: memcheck
and racecheck) and checks that the outputs are finite. Exit code 0 when every output is finite.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/cuda_smoke.py
"""

import sys

import torch

import fusedformer

ops = torch.ops.fusedformer


def main():
    assert torch.cuda.is_available() and fusedformer.built_with_cuda(), "needs a GPU and the CUDA build"
    torch.manual_seed(0)
    dev = "cuda"
    outs = {}
    bf = torch.bfloat16
    # softmax: register rows (vector and scalar loads), long rows, masks, causal; backward
    for n in (1000, 1001, 70000):
        x = torch.randn(4, n, device=dev, dtype=bf)
        outs[f"softmax {n}"] = ops.softmax_fwd(x, -1, 0.5, None, False)
        outs[f"softmax bwd {n}"] = ops.softmax_bwd(x, outs[f"softmax {n}"], -1, 1.0)
    x = torch.randn(2, 3, 40, 40, device=dev)
    m = torch.randn(2, 1, 40, 40, device=dev)
    outs["softmax mask causal"] = ops.softmax_fwd(x, -1, 1.0, m, True)
    outs["softmax bool"] = ops.softmax_fwd(x, -1, 1.0, m > 0, False)
    # norms: register rows, long rows, residual, backward with partial sums
    for n in (768, 770, 70000):
        x = torch.randn(8, n, device=dev, dtype=bf)
        r = torch.randn_like(x)
        w = torch.randn(n, device=dev, dtype=bf)
        y, h, mean, rstd = ops.layer_norm_fwd(x, [n], w, w, 1e-5, r)
        outs[f"layer_norm {n}"] = y
        outs[f"layer_norm bwd {n}"] = ops.layer_norm_bwd(y, y, h, mean, rstd, w, True, [n])[0]
        y, h, rstd = ops.rms_norm_fwd(x, [n], w, 1e-6, None)
        outs[f"rms_norm bwd {n}"] = ops.rms_norm_bwd(y, None, x, rstd, w, [n])[1]
    # attention: tensor cores (every bucket, plain and general), decode, SIMT, deterministic
    seed = torch.tensor(7)
    for dtype, E, L, S, mask, p, causal in (
        (bf, 64, 70, 130, False, 0.0, True),
        (torch.float16, 128, 65, 66, True, 0.1, False),
        (bf, 256, 33, 80, False, 0.0, False),
        (bf, 128, 1, 700, True, 0.0, False),
        (torch.float32, 40, 20, 50, True, 0.2, True),
    ):
        q = torch.randn(1, 2, L, E, device=dev, dtype=dtype)
        k = torch.randn(1, 2, S, E, device=dev, dtype=dtype)
        v = torch.randn(1, 2, S, E, device=dev, dtype=dtype)
        am = torch.rand(1, 2, L, S, device=dev) > 0.2 if mask else None
        o, lse = ops.attention_fwd(q, k, v, am, p, causal, 0.1, seed if p > 0 else None)
        outs[f"attention {dtype} {E} {L}"] = o
        g = torch.randn_like(o)
        outs[f"attention bwd {dtype} {E} {L}"] = ops.attention_bwd(g, q, k, v, o, lse, am, p, causal, 0.1,
                                                                    seed if p > 0 else None)[0]
    q, k, v = (torch.randn(1, 2, 130, 64, device=dev, dtype=bf) for _ in range(3))
    o, lse = ops.attention_fwd(q, k, v, None, 0.0, True, 0.1, None)
    torch.use_deterministic_algorithms(True)
    outs["attention bwd deterministic"] = ops.attention_bwd(o, q, k, v, o, lse, None, 0.0, True, 0.1, None)[0]
    torch.cuda.synchronize()
    bad = [k for k, t in outs.items() if not torch.isfinite(t.float()).all()]
    for k in bad:
        print("not finite:", k)
    print(f"{len(outs) - len(bad)} of {len(outs)} outputs finite")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

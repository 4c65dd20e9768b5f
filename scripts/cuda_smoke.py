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
    # gelu: forward, backward, in place (vector and scalar tails)
    for n in (4096, 1001):
        x = torch.randn(3, n, device=dev, dtype=bf)
        outs[f"gelu {n}"] = ops.gelu(x, "tanh")
        outs[f"gelu bwd {n}"] = ops.gelu_bwd(x, x, "none")
        y = x.clone()
        ops.gelu_(y, "none")
        outs[f"gelu_ {n}"] = y
    # cross-entropy rows: register rows and the long-row path, ignored rows, with gradients
    for V in (1000, 70001):
        logits = torch.randn(6, V, device=dev, dtype=bf)
        target = torch.randint(0, V, (6,), device=dev)
        target[2] = -100
        loss, grad = ops.cross_entropy_rows(logits, target, torch.tensor(0.5, device=dev), -100, True)
        outs[f"cross_entropy {V}"], outs[f"cross_entropy grad {V}"] = loss, grad
    # linear (cuBLAS) and quantized linear: the weight stream (<= 16 rows) and the dequantize path
    from fusedformer.ops.quantized_linear import quantize_weight

    w = torch.randn(300, 512, device=dev, dtype=bf)
    outs["linear"] = ops.linear(torch.randn(5, 512, device=dev, dtype=bf), w, None)
    for scheme, group in (("int8", None), ("int4", 32), ("nf4", 32), ("int8_dynamic", None)):
        qw, sc = quantize_weight(w.float().cpu(), scheme, group)
        qw, sc = qw.to(dev), sc.to(dev)
        for M in (1, 7, 40):
            x = torch.randn(M, 512, device=dev, dtype=bf)
            outs[f"quantized_linear {scheme} {M}"] = ops.quantized_linear(x, qw, sc, None, scheme)
    # paged attention: cache write, decode and chunked prefill, split-K over a long context
    Hq, Hkv, E, bs = 4, 2, 64, 16
    kc = torch.randn(200, Hkv, bs, E, device=dev, dtype=bf)
    vc = torch.randn_like(kc)
    kv = torch.randn(5, 2 * Hkv, E, device=dev, dtype=bf)
    ops.paged_cache_write(kv[:, :Hkv], kv[:, Hkv:], kc, vc, torch.tensor([3, -1, 40, 77, 3199], device=dev))
    outs["paged_cache_write"] = kc
    tables = torch.randperm(200, device=dev)[:180].view(2, 90)
    for name, lens, qlen in (("decode", (1400, 17), (1, 1)), ("prefill", (40, 1430), (9, 30))):
        q = torch.randn(sum(qlen), Hq, E, device=dev, dtype=bf)
        seq_lens = torch.tensor(lens, device=dev)
        starts = torch.tensor([0, qlen[0], sum(qlen)], device=dev)
        outs[f"paged_attention {name}"] = ops.paged_attention(q, kc, vc, tables, seq_lens, starts, E ** -0.5)
    torch.cuda.synchronize()
    bad = [k for k, t in outs.items() if not torch.isfinite(t.float()).all()]
    for k in bad:
        print("not finite:", k)
    print(f"{len(outs) - len(bad)} of {len(outs)} outputs finite")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""linear (suite ``kernels``) against ``F.linear``.

Few rows: the streaming kernel on GPT-2-124M's projections (q/k/v 768->2304, MLP 768->3072 and
3072->768, LM head 768->50257), for 1 and 8 rows (one decode step at batch 1 and 8) in float32 and with
bfloat16 weights. Bytes are the weight bytes, which each call must read once: the GB/s column says how
close a call is to memory speed (the LM head's 77-154 MB come from DRAM; the others fit the last-level
cache).

Many rows (float32, 4096 rows: a training batch or a long prompt): the blocked product on the same
projections and MiniLM's (384->1536, 1536->384), forward (``x W^T``, W read transposed in place) and
the backward's input gradient (``g W``, which the op computes as ``linear(g, W.T)``) and weight gradient
(``g^T x``, a reduction over the rows: ``linear(g.T, x.T)``)."""

import torch
import torch.nn.functional as F

from common import Case

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cases(device, quick):
    if device != "cpu":
        return []  # on the GPU the op is the library GEMM
    shapes = [(768, 2304), (768, 50257)] if quick else [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]
    out = []
    for dt in ["fp32", "bf16"]:
        dtype = DT[dt]
        for K, N in shapes:
            g = torch.Generator().manual_seed(N)
            w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
            b = torch.randn(N, generator=g).to(dtype)
            for M in [1, 8]:
                x = torch.randn(M, K, generator=g).to(dtype)

                def validate(x=x, w=w, b=b, dtype=dtype):
                    got = torch.ops.fusedformer.linear(x, w, b).double()
                    want = F.linear(x.double(), w.double(), b.double())
                    tol = 1e-4 if dtype == torch.float32 else 2e-2
                    torch.testing.assert_close(got, want, rtol=tol, atol=tol)

                out.append(Case(
                    op="linear", direction="fwd", dtype=dt, shape=f"({M}, {K}) x ({N}, {K})",
                    ours=lambda x=x, w=w, b=b: torch.ops.fusedformer.linear(x, w, b),
                    peers={"F.linear": lambda x=x, w=w, b=b: F.linear(x, w, b)},
                    validate=validate, bytes=w.numel() * w.element_size(),
                    note="weight bytes per call",
                ))
    out += _many_rows(quick)
    return out


def _many_rows(quick):
    M = 512 if quick else 4096
    shapes = [(768, 2304)] if quick else [(768, 2304), (768, 3072), (3072, 768), (384, 1536), (1536, 384)]
    out = []
    for K, N in shapes:
        g = torch.Generator().manual_seed(N + K)
        w = torch.randn(N, K, generator=g) * K ** -0.5
        b = torch.randn(N, generator=g)
        x = torch.randn(M, K, generator=g)
        dy = torch.randn(M, N, generator=g)
        for direction, ours, peer, ref in [
            ("fwd", lambda x=x, w=w, b=b: torch.ops.fusedformer.linear(x, w, b),
             lambda x=x, w=w, b=b: F.linear(x, w, b), lambda x=x, w=w, b=b: F.linear(x.double(), w.double(), b.double())),
            ("bwd", lambda dy=dy, w=w: torch.ops.fusedformer.linear(dy, w.t(), None),
             lambda dy=dy, w=w: dy @ w, lambda dy=dy, w=w: dy.double() @ w.double()),
            ("wgrad", lambda dy=dy, x=x: torch.ops.fusedformer.linear(dy.t(), x.t(), None),
             lambda dy=dy, x=x: dy.t() @ x, lambda dy=dy, x=x: dy.double().t() @ x.double()),
        ]:
            def validate(ours=ours, ref=ref):
                torch.testing.assert_close(ours().double(), ref(), rtol=1e-4, atol=1e-4)

            shape = {"fwd": f"({M}, {K}) x ({N}, {K})", "bwd": f"({M}, {N}) x ({N}, {K})",
                     "wgrad": f"({M}, {N})^T x ({M}, {K})"}[direction]
            out.append(Case(op="linear", direction=direction, dtype="fp32", shape=shape, ours=ours,
                            peers={"F.linear" if direction == "fwd" else "matmul": peer}, validate=validate,
                            flops=2.0 * M * N * K, note="many rows: the blocked product"))
    return out

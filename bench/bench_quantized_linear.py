"""quantized_linear (suite ``kernels``): int8, int4 and nf4 (group 32) weights against ``F.linear`` in
float32 and in bfloat16 and against ``fusedformer.ops.linear`` with bfloat16 weights.

Shapes: GPT-2-small's projections (768->2304, 768->3072, 3072->768) and Llama-7B's (4096->4096,
4096->11008); 1 and 8 rows (a decode step at batch 1 and 8: the packed weights streamed once) and 64
rows (dequantized panels through the blocked product), plus int8_dynamic at 64 rows; nf4 (int4's bytes,
other levels in the same 16-entry table) at 1 row. Bytes are the
packed weight bytes (and scales) each call must read: the GB/s column is the weight stream's speed.
Every case is checked against the float64 dequantize-then-matmul reference before it is timed."""

import torch
import torch.nn.functional as F

import fusedformer
from fusedformer import reference
from fusedformer.ops.quantized_linear import dequantize_weight, quantize_weight

from common import Case


def cases(device, quick):
    if device != "cpu":
        return []
    shapes = [(768, 2304), (4096, 4096)] if quick else [(768, 2304), (768, 3072), (3072, 768), (4096, 4096),
                                                        (4096, 11008)]
    rows = [1, 8] if quick else [1, 8, 64]
    out = []
    for K, N in shapes:
        g = torch.Generator().manual_seed(N + K)
        w = torch.randn(N, K, generator=g) * K ** -0.5
        w_bf = w.to(torch.bfloat16)
        packed = {"int8": quantize_weight(w, "int8"), "int4": quantize_weight(w, "int4", 32),
                  "nf4": quantize_weight(w, "nf4", 32)}
        deq = {s: dequantize_weight(q, sc, s) for s, (q, sc) in packed.items()}
        for M in rows:
            x = torch.randn(M, K, generator=g)
            x_bf = x.to(torch.bfloat16)
            schemes = ["int8", "int4"] + (["nf4"] if M == 1 else []) + (["int8_dynamic"] if M >= 64 else [])
            for scheme in schemes:
                q, sc = packed["int8" if scheme == "int8_dynamic" else scheme]
                wq = deq["int8" if scheme == "int8_dynamic" else scheme]

                def ours(x=x, q=q, sc=sc, scheme=scheme):
                    return fusedformer.ops.quantized_linear(x, q, sc, None, scheme)

                def validate(ours=ours, x=x, q=q, sc=sc, scheme=scheme):
                    want = reference.quantized_linear(x, q, sc, None, scheme)
                    torch.testing.assert_close(ours().double(), want, rtol=1e-4, atol=1e-4)

                out.append(Case(
                    op="quantized_linear", direction="fwd", dtype=f"fp32 x {scheme}",
                    shape=f"({M}, {K}) x ({N}, {K})", ours=ours,
                    peers={
                        "F.linear fp32": lambda x=x, w=wq: F.linear(x, w),
                        "F.linear bf16": lambda x=x_bf, w=w_bf: F.linear(x, w),
                        "ff.linear bf16": lambda x=x_bf, w=w_bf: fusedformer.ops.linear(x, w),
                    },
                    validate=validate, bytes=q.numel() * q.element_size() + sc.numel() * 4,
                    note="packed weight bytes per call", peer_dtype="fp32 weights",
                ))
    return out

"""linear for few rows (suite ``kernels``): the streaming kernel against ``F.linear`` on GPT-2-124M's
projections (q/k/v 768->2304, MLP 768->3072 and 3072->768, LM head 768->50257), for 1 and 8 rows (one
decode step at batch 1 and 8) in float32 and with bfloat16 weights. Bytes are the weight bytes, which
each call must read once: the GB/s column says how close a call is to memory speed (the LM head's
77-154 MB come from DRAM; the others fit the last-level cache)."""

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
    return out

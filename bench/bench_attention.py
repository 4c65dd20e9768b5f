"""attention forward and forward+backward against F.scaled_dot_product_attention."""

import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from common import Case

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(q, k, v, causal):
    ours = fusedformer.attention(q, k, v, is_causal=causal)
    want = ref.attention(q, k, v, is_causal=causal)
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours.double().cpu(), want, rtol=tol, atol=tol)


def cases(device, quick):
    out = []
    if device == "cpu":
        configs = [(1, 12, 1024, 64), (4, 12, 512, 64)]
        dtypes = ["fp32"]
    else:
        configs = [(4, 16, 4096, 128)] if not quick else [(2, 16, 1024, 128)]
        dtypes = ["bf16"]
    for dt in dtypes:
        dtype = DT[dt]
        for (B, H, L, E) in configs:
            q, k, v = (torch.randn(B, H, L, E, device=device, dtype=dtype) for _ in range(3))
            for causal in (False, True):
                flops = 4 * B * H * L * L * E / (2 if causal else 1)
                shape = f"({B}, {H}, {L}, {E}){' causal' if causal else ''}"
                target = 1.0 if device == "cpu" and dt == "fp32" else None
                out.append(Case(
                    op="attention", direction="fwd", dtype=dt, shape=shape,
                    ours=lambda q=q, k=k, v=v, c=causal: fusedformer.attention(q, k, v, is_causal=c),
                    peers={"F.sdpa": lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
                        q, k, v, is_causal=c)},
                    validate=(lambda q=q, k=k, v=v, c=causal: _check(q, k, v, c)) if not quick or L <= 1024 else None,
                    flops=flops, target=target,
                ))
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                g = torch.randn_like(q)

                def ours_fb(qg=qg, kg=kg, vg=vg, g=g, c=causal):
                    o = fusedformer.attention(qg, kg, vg, is_causal=c)
                    return torch.autograd.grad(o, (qg, kg, vg), g)

                def peer_fb(qg=qg, kg=kg, vg=vg, g=g, c=causal):
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=c)
                    return torch.autograd.grad(o, (qg, kg, vg), g)

                out.append(Case(
                    op="attention", direction="fwd+bwd", dtype=dt, shape=shape,
                    ours=ours_fb, peers={"F.sdpa": peer_fb}, flops=flops * 3.5, target=target,
                ))
    return out

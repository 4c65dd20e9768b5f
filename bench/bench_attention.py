"""attention forward and forward+backward against F.scaled_dot_product_attention. Every case is
checked against the float64 reference (output, and the gradients of query, key and value) before it
is timed."""

import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from common import Case, check_result, grads

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cases(device, quick):
    out = []
    if device == "cpu":
        configs = [(1, 12, 1024, 64), (4, 12, 512, 64)] if not quick else [(1, 12, 256, 64)]
        dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    else:
        configs = [(4, 16, 4096, 128)] if not quick else [(2, 16, 1024, 128)]
        dtypes = ["bf16"]
    for dt in dtypes:
        dtype = DT[dt]
        for (B, H, L, E) in configs:
            q, k, v = (torch.randn(B, H, L, E, device=device, dtype=dtype) for _ in range(3))
            g = torch.randn_like(q)
            for causal in (False, True):
                flops = 4 * B * H * L * L * E / (2 if causal else 1)
                shape = f"({B}, {H}, {L}, {E}){' causal' if causal else ''}"
                target = 1.0 if device == "cpu" and dt == "fp32" else None

                def ours(c=causal, q=q, k=k, v=v):
                    return fusedformer.attention(q, k, v, is_causal=c)

                def peer(c=causal, q=q, k=k, v=v):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=c)

                out.append(Case(
                    op="attention", direction="fwd", dtype=dt, shape=shape, ours=ours, peers={"F.sdpa": peer},
                    validate=lambda o=ours, p=peer, c=causal, q=q, k=k, v=v, dtype=dtype: check_result(
                        o(), p(), ref.attention(q, k, v, is_causal=c), dtype, 1e-4),
                    flops=flops, target=target,
                ))
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

                def ours_fb(qg=qg, kg=kg, vg=vg, g=g, c=causal):
                    o = fusedformer.attention(qg, kg, vg, is_causal=c)
                    return torch.autograd.grad(o, (qg, kg, vg), g)

                def peer_fb(qg=qg, kg=kg, vg=vg, g=g, c=causal):
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=c)
                    return torch.autograd.grad(o, (qg, kg, vg), g)

                def validate_fb(o=ours_fb, p=peer_fb, c=causal, q=q, k=k, v=v, g=g, dtype=dtype):
                    want = grads(lambda a, b, cc: ref.attention(a, b, cc, is_causal=c), [q, k, v], g, torch.float64)
                    check_result(o(), p(), want, dtype, 1e-4, 5e-2, "attention gradients")

                out.append(Case(
                    op="attention", direction="fwd+bwd", dtype=dt, shape=shape, ours=ours_fb, peers={"F.sdpa": peer_fb},
                    validate=validate_fb, flops=flops * 3.5, target=target,
                ))
    return out

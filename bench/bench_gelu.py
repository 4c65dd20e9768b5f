"""gelu, exact and tanh, forward and backward, against F.gelu (and the in-place form the models use
in inference). Every case is checked against float64 before it is timed."""

import torch
import torch.nn.functional as F

import fusedformer
from common import Case, check_result, grads

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cases(device, quick):
    out = []
    shapes = [(4096, 1024)] if quick else [(4096, 1024), (2048, 3072)]
    dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    for dt in dtypes:
        dtype = DT[dt]
        for shape in shapes:
            x = torch.randn(*shape, device=device, dtype=dtype)
            g = torch.randn_like(x)
            es = x.element_size()
            for approx in ("none", "tanh"):
                label = f"{shape} {approx}"

                def want(x=x, a=approx):
                    return F.gelu(x.double(), approximate=a)

                out.append(Case(
                    op="gelu", direction="fwd", dtype=dt, shape=label,
                    ours=lambda x=x, a=approx: fusedformer.ops.gelu(x, a),
                    peers={"F.gelu": lambda x=x, a=approx: F.gelu(x, approximate=a)},
                    validate=lambda x=x, a=approx, dtype=dtype, want=want: check_result(
                        fusedformer.ops.gelu(x, a), F.gelu(x, approximate=a), want(), dtype, 1e-5, 1e-3),
                    bytes=2 * x.numel() * es,
                ))
                buf = x.clone()

                def ours_inplace(x=x, buf=buf, a=approx):
                    buf.copy_(x)
                    return fusedformer.ops.gelu_(buf, a)

                def peer_inplace(x=x, buf=buf, a=approx):
                    buf.copy_(x)
                    return F.gelu(buf, approximate=a)

                out.append(Case(
                    op="gelu", direction="fwd in place", dtype=dt, shape=label, ours=ours_inplace,
                    peers={"copy + F.gelu": peer_inplace},
                    validate=lambda o=ours_inplace, p=peer_inplace, dtype=dtype, want=want: check_result(
                        o().clone(), p(), want(), dtype, 1e-5, 1e-3),
                    # the least traffic any implementation moves: the input read, the buffer written
                    # (the buffer's second pass may stay in cache, so counting it would overstate GB/s)
                    bytes=2 * x.numel() * es, note="both sides copy the input into the buffer first",
                ))
                xg = x.clone().requires_grad_()
                y_ours = fusedformer.ops.gelu(xg, approx)
                y_peer = F.gelu(xg, approximate=approx)

                def ours_bwd(y=y_ours, xg=xg, g=g):
                    return torch.autograd.grad(y, (xg,), g, retain_graph=True)

                def peer_bwd(y=y_peer, xg=xg, g=g):
                    return torch.autograd.grad(y, (xg,), g, retain_graph=True)

                out.append(Case(
                    op="gelu", direction="bwd", dtype=dt, shape=label, ours=ours_bwd, peers={"F.gelu backward": peer_bwd},
                    validate=lambda o=ours_bwd, p=peer_bwd, x=x, g=g, a=approx, dtype=dtype: check_result(
                        o(), p(), grads(lambda t: F.gelu(t, approximate=a), [x], g, torch.float64), dtype, 1e-5, 1e-3),
                    bytes=3 * x.numel() * es,
                ))
    return out

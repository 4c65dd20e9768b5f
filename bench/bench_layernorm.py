"""layer_norm / rms_norm, forward and backward, and the fused residual form."""

import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from common import Case

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(ours, want, dtype):
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(ours.double().cpu(), want, rtol=tol, atol=tol)


def cases(device, quick):
    out = []
    shapes = [(8192, 768)] + ([] if quick else [(4096, 4096)])
    dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    for dt in dtypes:
        dtype = DT[dt]
        for shape in shapes:
            n = shape[-1]
            x = torch.randn(*shape, device=device, dtype=dtype)
            r = torch.randn(*shape, device=device, dtype=dtype)
            w = torch.randn(n, device=device, dtype=dtype)
            b = torch.randn(n, device=device, dtype=dtype)
            es = x.element_size()
            cpu_fp32 = device == "cpu" and dt == "fp32"
            # outputs over 32 MiB: fresh pages on every call (see DESIGN.md), bar 1.0x
            large = x.numel() * es > 32 * 2**20

            def tgt(bar, large=large, cpu_fp32=cpu_fp32):
                return (1.0 if large else bar) if cpu_fp32 else None
            out.append(Case(
                op="layer_norm", direction="fwd", dtype=dt, shape=str(shape),
                ours=lambda x=x, w=w, b=b, n=n: fusedformer.layer_norm(x, n, w, b),
                peers={"F.layer_norm": lambda x=x, w=w, b=b, n=n: F.layer_norm(x, (n,), w, b)},
                validate=lambda x=x, w=w, b=b, n=n, dtype=dtype: _check(
                    fusedformer.layer_norm(x, n, w, b), ref.layer_norm(x, n, w, b), dtype),
                bytes=2 * x.numel() * es, target=tgt(1.2), large=large,
            ))
            out.append(Case(
                op="layer_norm", direction="fwd", dtype=dt, shape=f"{shape} +residual",
                ours=lambda x=x, r=r, w=w, b=b, n=n: fusedformer.layer_norm(x, n, w, b, residual=r),
                peers={"eager x+r, F.layer_norm": lambda x=x, r=r, w=w, b=b, n=n: F.layer_norm(x + r, (n,), w, b)},
                validate=lambda x=x, r=r, w=w, b=b, n=n, dtype=dtype: _check(
                    fusedformer.layer_norm(x, n, w, b, residual=r)[0], ref.layer_norm(x, n, w, b, residual=r)[0],
                    dtype),
                bytes=4 * x.numel() * es, target=tgt(2.0), large=large,
            ))
            out.append(Case(
                op="rms_norm", direction="fwd", dtype=dt, shape=str(shape),
                ours=lambda x=x, w=w, n=n: fusedformer.rms_norm(x, n, w),
                peers={"F.rms_norm": lambda x=x, w=w, n=n: F.rms_norm(x, (n,), w)},
                validate=lambda x=x, w=w, n=n, dtype=dtype: _check(
                    fusedformer.rms_norm(x, n, w), ref.rms_norm(x, n, w), dtype),
                bytes=2 * x.numel() * es, target=tgt(3.0), large=large,
            ))
            # backward: input, weight and bias gradients
            xg = x.clone().requires_grad_()
            wg = w.clone().requires_grad_()
            bg = b.clone().requires_grad_()
            g = torch.randn_like(x)
            y_ours = fusedformer.layer_norm(xg, n, wg, bg)
            y_peer = F.layer_norm(xg, (n,), wg, bg)
            out.append(Case(
                op="layer_norm", direction="bwd", dtype=dt, shape=str(shape),
                ours=lambda y=y_ours, g=g, xg=xg, wg=wg, bg=bg: torch.autograd.grad(y, (xg, wg, bg), g,
                                                                                   retain_graph=True),
                peers={"F.layer_norm backward": lambda y=y_peer, g=g, xg=xg, wg=wg, bg=bg: torch.autograd.grad(
                    y, (xg, wg, bg), g, retain_graph=True)},
                bytes=3 * x.numel() * es, target=tgt(1.2), large=large,
            ))
    return out

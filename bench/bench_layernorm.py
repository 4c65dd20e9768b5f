"""layer_norm / rms_norm, forward and backward, and the fused residual form, against
torch.nn.functional. Every case is checked against float64 (``fusedformer.reference``; backward
cases against autograd of the float64 torch functions) before it is timed."""

import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from common import Case, check_result, grads

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bwd_case(name, dt, shape, ours_fn, peer_fn, ref_fn, inputs, g, nbytes, target, large):
    """Backward of ``fn(*inputs)`` for every input (input, weight, bias) against torch's; ``ref_fn``
    runs on float64 copies for the reference gradients."""
    dtype = inputs[0].dtype
    leaves = [t.clone().requires_grad_() for t in inputs]
    y_ours, y_peer = ours_fn(*leaves), peer_fn(*leaves)

    def ours():
        return torch.autograd.grad(y_ours, leaves, g, retain_graph=True)

    def peer():
        return torch.autograd.grad(y_peer, leaves, g, retain_graph=True)

    def validate():
        want = grads(ref_fn, inputs, g, torch.float64)
        # weight / bias gradients sum over all rows: scale the tolerance with the row count
        check_result(ours(), peer(), want, dtype, 1e-4 * shape[0] ** 0.5, 5e-2, f"{name} gradients")

    return Case(op=name, direction="bwd", dtype=dt, shape=str(shape), ours=ours,
                peers={f"F.{name} backward": peer}, validate=validate, bytes=nbytes, target=target, large=large)


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
            g = torch.randn_like(x)
            es = x.element_size()
            cpu_fp32 = device == "cpu" and dt == "fp32"
            # outputs over 32 MiB: fresh pages on every call (DESIGN.md, Benchmarks), bar 1.0x
            large = x.numel() * es > 32 * 2**20

            def tgt(bar, large=large, cpu_fp32=cpu_fp32):
                return (1.0 if large else bar) if cpu_fp32 else None

            out.append(Case(
                op="layer_norm", direction="fwd", dtype=dt, shape=str(shape),
                ours=lambda x=x, w=w, b=b, n=n: fusedformer.layer_norm(x, n, w, b),
                peers={"F.layer_norm": lambda x=x, w=w, b=b, n=n: F.layer_norm(x, (n,), w, b)},
                validate=lambda x=x, w=w, b=b, n=n, dtype=dtype: check_result(
                    fusedformer.layer_norm(x, n, w, b), F.layer_norm(x, (n,), w, b), ref.layer_norm(x, n, w, b),
                    dtype, 1e-4),
                bytes=2 * x.numel() * es, target=tgt(1.2), large=large,
            ))
            out.append(Case(
                op="layer_norm", direction="fwd", dtype=dt, shape=f"{shape} +residual",
                ours=lambda x=x, r=r, w=w, b=b, n=n: fusedformer.layer_norm(x, n, w, b, residual=r),
                peers={"eager x+r, F.layer_norm": lambda x=x, r=r, w=w, b=b, n=n: F.layer_norm(x + r, (n,), w, b)},
                validate=lambda x=x, r=r, w=w, b=b, n=n, dtype=dtype: check_result(
                    fusedformer.layer_norm(x, n, w, b, residual=r)[0], F.layer_norm(x + r, (n,), w, b),
                    ref.layer_norm(x, n, w, b, residual=r)[0], dtype, 1e-4),
                bytes=4 * x.numel() * es, target=tgt(2.0), large=large,
            ))
            out.append(Case(
                op="rms_norm", direction="fwd", dtype=dt, shape=str(shape),
                ours=lambda x=x, w=w, n=n: fusedformer.rms_norm(x, n, w),
                peers={"F.rms_norm": lambda x=x, w=w, n=n: F.rms_norm(x, (n,), w)},
                validate=lambda x=x, w=w, n=n, dtype=dtype: check_result(
                    fusedformer.rms_norm(x, n, w), F.rms_norm(x, (n,), w), ref.rms_norm(x, n, w), dtype, 1e-4),
                bytes=2 * x.numel() * es, target=tgt(3.0), large=large,
                note="F.rms_norm in bf16 takes an unfused ATen composition" if dt == "bf16" else "",
            ))
            out.append(_bwd_case(
                "layer_norm", dt, shape, lambda x, w, b, n=n: fusedformer.layer_norm(x, n, w, b),
                lambda x, w, b, n=n: F.layer_norm(x, (n,), w, b), lambda x, w, b, n=n: F.layer_norm(x, (n,), w, b),
                [x, w, b], g, 3 * x.numel() * es, tgt(1.2), large))
            out.append(_bwd_case(
                "rms_norm", dt, shape, lambda x, w, n=n: fusedformer.rms_norm(x, n, w),
                lambda x, w, n=n: F.rms_norm(x, (n,), w), lambda x, w, n=n, eps=torch.finfo(dtype).eps: F.rms_norm(x, (n,), w, eps=eps),
                [x, w], g, 3 * x.numel() * es, None, large))
    return out

"""softmax: plain, and scaled + masked, against torch.softmax and the eager composition."""

import torch

import fusedformer
import fusedformer.reference as ref
from common import Case

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(ours, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.double().cpu(), want, rtol=tol, atol=tol)


def cases(device, quick):
    out = []
    shapes = [(1024, 4096), (4096, 1024)] + ([] if quick else [(8192, 4096)])
    dtypes = ["fp32"] if quick or device == "cpu" else ["fp32", "bf16"]
    if device == "cpu" and not quick:
        dtypes = ["fp32", "bf16"]
    for dt in dtypes:
        dtype = DT[dt]
        for shape in shapes:
            x = torch.randn(*shape, device=device, dtype=dtype)
            nbytes = 2 * x.numel() * x.element_size()
            large = nbytes / 2 > 24e6
            out.append(Case(
                op="softmax", direction="fwd", dtype=dt, shape=str(shape),
                ours=lambda x=x: fusedformer.softmax(x, -1),
                peers={"torch.softmax": lambda x=x: torch.softmax(x, -1)},
                validate=lambda x=x, dtype=dtype: _check(fusedformer.softmax(x, -1), ref.softmax(x, -1), dtype),
                bytes=nbytes, large=large,
                target=(1.0 if large else 2.0) if dt == "fp32" and device == "cpu" else None,
            ))
            g = torch.randn_like(x)
            y = fusedformer.softmax(x, -1)
            yt = torch.softmax(x, -1)
            out.append(Case(
                op="softmax", direction="bwd", dtype=dt, shape=str(shape),
                ours=lambda g=g, y=y: torch.ops.fusedformer.softmax_bwd(g, y, -1, 1.0),
                peers={"torch._softmax_backward_data": lambda g=g, yt=yt, dtype=dtype:
                       torch._softmax_backward_data(g, yt, -1, dtype)},
                bytes=3 * x.numel() * x.element_size(), large=large,
            ))
    # scaled + masked (attention-score shaped): the eager composition softmax(x * scale + mask)
    shape = (8, 12, 256, 256) if not quick else (2, 12, 256, 256)
    for dt in dtypes:
        dtype = DT[dt]
        x = torch.randn(*shape, device=device, dtype=dtype)
        m = torch.randn(shape[0], 1, shape[2], shape[3], device=device, dtype=dtype)
        out.append(Case(
            op="softmax", direction="fwd", dtype=dt, shape=f"{shape} scale+mask",
            ours=lambda x=x, m=m: fusedformer.softmax(x, -1, scale=0.125, mask=m),
            peers={"eager softmax(x*s+m)": lambda x=x, m=m: torch.softmax(x * 0.125 + m, -1)},
            validate=lambda x=x, m=m, dtype=dtype: _check(
                fusedformer.softmax(x, -1, scale=0.125, mask=m), ref.softmax(x, -1, scale=0.125, mask=m), dtype),
            bytes=2 * x.numel() * x.element_size() + m.numel() * m.element_size(),
            target=2.5 if dt == "fp32" and device == "cpu" else None,
        ))
    return out

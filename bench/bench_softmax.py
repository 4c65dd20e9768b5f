"""softmax, forward and backward, plain and scaled + masked, against torch.softmax, its backward and
the eager composition. Every case is checked against float64 (``fusedformer.reference``; the
backward against autograd of float64 ``torch.softmax``) before it is timed."""

import torch

import fusedformer
import fusedformer.reference as ref
from common import Case, check_result, grads

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cases(device, quick):
    out = []
    shapes = [(1024, 4096), (4096, 1024)] + ([] if quick else [(8192, 4096)])
    dtypes = ["fp32"] if quick else ["fp32", "bf16"]
    for dt in dtypes:
        dtype = DT[dt]
        cpu_fp32 = dt == "fp32" and device == "cpu"
        for shape in shapes:
            x = torch.randn(*shape, device=device, dtype=dtype)
            nbytes = 2 * x.numel() * x.element_size()
            large = nbytes / 2 > 24e6
            out.append(Case(
                op="softmax", direction="fwd", dtype=dt, shape=str(shape),
                ours=lambda x=x: fusedformer.softmax(x, -1),
                peers={"torch.softmax": lambda x=x: torch.softmax(x, -1)},
                validate=lambda x=x, dtype=dtype: check_result(
                    fusedformer.softmax(x, -1), torch.softmax(x, -1), ref.softmax(x, -1), dtype, 1e-5, 1e-3),
                bytes=nbytes, large=large, target=(1.0 if large else 2.0) if cpu_fp32 else None,
            ))
            g = torch.randn_like(x)
            y = fusedformer.softmax(x, -1)
            yt = torch.softmax(x, -1)

            def ours_bwd(g=g, y=y):
                return torch.ops.fusedformer.softmax_bwd(g, y, -1, 1.0)

            def peer_bwd(g=g, yt=yt, dtype=dtype):
                return torch._softmax_backward_data(g, yt, -1, dtype)

            out.append(Case(
                op="softmax", direction="bwd", dtype=dt, shape=str(shape), ours=ours_bwd,
                peers={"torch._softmax_backward_data": peer_bwd},
                validate=lambda x=x, g=g, dtype=dtype, o=ours_bwd, p=peer_bwd: check_result(
                    o(), p(), grads(lambda t: torch.softmax(t, -1), [x], g, torch.float64)[0], dtype, 1e-5, 1e-3),
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
            validate=lambda x=x, m=m, dtype=dtype: check_result(
                fusedformer.softmax(x, -1, scale=0.125, mask=m), torch.softmax(x * 0.125 + m, -1),
                ref.softmax(x, -1, scale=0.125, mask=m), dtype, 1e-5, 1e-3),
            bytes=2 * x.numel() * x.element_size() + m.numel() * m.element_size(),
            target=2.5 if dt == "fp32" and device == "cpu" else None,
        ))
    return out

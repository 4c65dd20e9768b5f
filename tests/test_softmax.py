"""fusedformer.ops.softmax: values and gradients against the float64 reference, masks, causal,
fully masked rows, every instruction set, opcheck, torch.compile and the error messages."""

import pytest
import torch

import fusedformer
import fusedformer.reference as ref
from _util import DEVICES, ISAS, LOWP, assert_matches_reference, cpu_isa, make

_ops = torch.ops.fusedformer


def _ref_grads(x, g, dim, scale, mask, is_causal):
    """float64 gradients of softmax(x * scale + mask) for upstream g: (grad_x, grad_mask or None)."""
    y = ref.softmax(x, dim, scale=scale, mask=mask, is_causal=is_causal)
    g = g.detach().double().cpu()
    gz = y * (g - (g * y).sum(dim, keepdim=True))
    gm = gz.sum_to_size(mask.shape) if mask is not None and mask.dtype != torch.bool else None
    return gz * scale, gm


def _run(x, dim=-1, scale=1.0, mask=None, is_causal=False, *, isa=None, grad=True):
    """Ours, forward and backward, against the reference (float32 / float64 inputs)."""
    xg = x.detach().clone().requires_grad_(grad)
    mg = mask
    if grad and mask is not None and mask.dtype != torch.bool:
        mg = mask.detach().clone().requires_grad_(True)
    with cpu_isa(isa or ISAS[-1]):
        y = fusedformer.softmax(xg, dim, scale=scale, mask=mg, is_causal=is_causal)
        assert y.shape == x.shape and y.dtype == x.dtype
        want = ref.softmax(x, dim, scale=scale, mask=mask, is_causal=is_causal)
        assert_matches_reference(y, want, what="softmax forward")
        if not grad:
            return y
        g = torch.randn_like(y)
        y.backward(g)
    gx_ref, gm_ref = _ref_grads(x, g, dim, scale, mask, is_causal)
    assert_matches_reference(xg.grad, gx_ref, what="grad x")
    if gm_ref is not None:
        lowp_mask = mask.dtype in (torch.bfloat16, torch.float16)  # its gradient is rounded to that dtype
        assert_matches_reference(mg.grad, gm_ref, rtol=1e-2 if lowp_mask else 1e-5, what="grad mask")
    return y


# ---------------------------------------------------------------------------------------------
# shapes and layouts


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(1,), (5, 1), (4, 3), (7, 17), (3, 1000), (2, 4097), (2, 3, 5, 33)])
def test_rows(isa, shape):
    _run(make(shape, scale=3.0), isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scale", [0.125, -0.7, 0.0])
def test_scale(isa, scale):
    _run(make((6, 45), scale=2.0), scale=scale, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,dim", [((3, 17, 5), 1), ((2, 1000, 33), 1), ((4, 7, 1030), -2), ((9, 3, 2), 0),
                                       ((17,), 0), ((3, 1, 40), 1)])
def test_dim_not_last(isa, shape, dim):
    _run(make(shape, scale=2.0), dim, scale=0.9, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_noncontiguous(isa):
    _run(make((6, 74))[:, ::2], isa=isa)
    _run(make((37, 6)).t(), 0, isa=isa)
    _run(make((5, 8, 9)).transpose(0, 2), 1, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_long_rows(isa):
    # rows longer than the in-cache length (segments merged), and a single long row spread over threads
    _run(make((3, 40000), scale=4.0), isa=isa)
    _run(make((1, 70001), scale=4.0), isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_large_output(isa):
    # an output over the streaming-store threshold, rows not a multiple of the vector width
    _run(make((260, 4097), scale=2.0), scale=0.5, isa=isa, grad=True)
    _run(make((64, 130, 130), scale=2.0), 1, isa=isa, grad=True)


def test_float64_gradcheck():
    x = make((3, 2, 5), torch.float64, requires_grad=True)
    m = make((2, 5), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, m: fusedformer.softmax(x, -1, scale=0.7, mask=m), (x, m))
    assert torch.autograd.gradcheck(lambda x: fusedformer.softmax(x, 1, is_causal=True), (x,))
    keep = torch.rand(3, 2, 5) > 0.3
    assert torch.autograd.gradcheck(lambda x: fusedformer.softmax(x, 0, scale=1.5, mask=keep), (x,))


# ---------------------------------------------------------------------------------------------
# masks and causal


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [-1, -2])
def test_bool_mask_broadcast(isa, dim):
    x = make((2, 3, 9, 21), scale=2.0)
    for mshape in [(2, 1, 9, 21), (9, 21), (1, 21), (9, 1), (2, 3, 1, 1)]:
        keep = torch.rand(mshape) > 0.4
        _run(x, dim, scale=0.8, mask=keep, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [-1, -2])
def test_additive_mask_broadcast(isa, dim):
    x = make((2, 3, 9, 21), scale=2.0)
    for mshape in [(2, 1, 9, 21), (21,), (9, 1), (3, 1, 1)]:
        _run(x, dim, scale=0.3, mask=make(mshape, scale=2.0), isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_additive_mask_lowp_and_neg_inf(isa):
    x = make((4, 6, 19), scale=2.0)
    m = make((6, 19)).to(torch.bfloat16)
    _run(x, mask=m, isa=isa)
    m = torch.zeros(6, 19)
    m[:, ::3] = float("-inf")
    _run(x, scale=2.0, mask=m, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("L,S", [(9, 9), (5, 12), (12, 5), (1, 40), (40, 1030)])
def test_causal(isa, L, S):
    x = make((2, L, S), scale=2.0)
    _run(x, is_causal=True, isa=isa)
    _run(x, scale=0.5, mask=torch.rand(L, S) > 0.2, is_causal=True, isa=isa)
    _run(x, scale=0.5, mask=make((L, S)), is_causal=True, isa=isa)
    # the softmax along the query dim and along another dim (causal still on the last two dims)
    _run(x, -2, is_causal=True, isa=isa)
    _run(x, 0, mask=make((1, S)), is_causal=True, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [-1, -2])
def test_fully_masked_rows_are_zero(isa, dim):
    x = make((3, 8, 24), scale=2.0)
    keep = torch.rand(3, 8, 24) > 0.5
    keep[0, 2] = False  # a row of the last dim
    keep[1, :, 5] = False  # a column (a row of dim -2)
    add = torch.where(keep, 0.0, float("-inf"))
    for mask in [keep, add]:
        y = _run(x, dim, scale=0.7, mask=mask, isa=isa)
        assert not torch.isnan(y).any()
        row = (0, 2) if dim == -1 else (1, slice(None), 5)
        assert (y[row] == 0).all()
        xg = x.clone().requires_grad_()
        with cpu_isa(isa):
            fusedformer.softmax(xg, dim, mask=mask).sum().backward()
        assert (xg.grad[row] == 0).all() and not torch.isnan(xg.grad).any()
    # a mask broadcast along the row that drops all of it
    with cpu_isa(isa):
        y = fusedformer.softmax(x, mask=torch.zeros(8, 1, dtype=torch.bool))
    assert (y == 0).all()


def test_nan_input_gives_nan_row():
    x = make((3, 20))
    x[1, 7] = float("nan")
    for isa in ISAS:
        with cpu_isa(isa):
            y = fusedformer.softmax(x)
        assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[2]).any()


# ---------------------------------------------------------------------------------------------
# low precision


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape,dim", [((5, 17), -1), ((3, 4097), -1), ((4, 33, 20), 1), ((2, 20000), -1)])
def test_low_precision(isa, dtype, shape, dim):
    x = make(shape, dtype, scale=3.0)
    m = make(shape[-1:], scale=1.0)
    xg = x.clone().requires_grad_()
    xp = x.clone().requires_grad_()
    with cpu_isa(isa):
        y = fusedformer.softmax(xg, dim, scale=0.6, mask=m)
    peer = torch.softmax(xp * 0.6 + m.to(dtype), dim)
    assert y.dtype == dtype
    assert_matches_reference(y, ref.softmax(x, dim, scale=0.6, mask=m), peer, what=f"{dtype} forward")
    g = make(shape, dtype)
    with cpu_isa(isa):
        y.backward(g)
    peer.backward(g)
    gx_ref, _ = _ref_grads(x, g, dim, 0.6, m, False)
    assert_matches_reference(xg.grad, gx_ref, xp.grad, what=f"{dtype} grad x")


# ---------------------------------------------------------------------------------------------
# op registration, compile, devices


def test_opcheck():
    x = make((2, 3, 7))
    m = make((3, 7))
    keep = torch.rand(2, 1, 7) > 0.3
    for args in [(x, -1, 0.5, m, False), (x, 1, 1.0, keep, True), (x.requires_grad_(), -1, 1.0, None, True)]:
        torch.library.opcheck(_ops.softmax_fwd.default, args)
    y = fusedformer.softmax(x.detach())
    torch.library.opcheck(_ops.softmax_bwd.default, (torch.randn_like(y), y, -1, 0.5))
    torch.library.opcheck(_ops.softmax_bwd.default, (torch.randn_like(y), y, 0, 1.0))


def test_compile_fullgraph():
    def f(x, m):
        return fusedformer.softmax(x * 2.0, -1, scale=0.5, mask=m, is_causal=True).sum(-1)

    x = make((2, 6, 6), requires_grad=True)
    m = make((6, 6))
    got = torch.compile(f, fullgraph=True)(x, m)
    want = f(x.detach(), m)
    torch.testing.assert_close(got.detach(), want)
    got.sum().backward()
    assert x.grad is not None and not torch.isnan(x.grad).any()


@pytest.mark.parametrize("device", DEVICES)
def test_devices(device):
    x = make((4, 3, 50), device=device, scale=2.0)
    m = make((3, 50), device=device)
    y = fusedformer.softmax(x, -1, scale=0.5, mask=m, is_causal=True)
    assert y.device == x.device
    assert_matches_reference(y.cpu(), ref.softmax(x, -1, scale=0.5, mask=m, is_causal=True))


# ---------------------------------------------------------------------------------------------
# errors name the argument


def test_errors():
    x = make((4, 8))
    with pytest.raises(TypeError, match="x must be float32"):
        fusedformer.softmax(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fusedformer.softmax(x, mask=torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask of shape \[3, 8\] does not broadcast to \[4, 8\]"):
        fusedformer.softmax(x, mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask of shape"):
        fusedformer.softmax(x, mask=torch.zeros(2, 4, 8))
    with pytest.raises(IndexError, match=r"dim must be in \[-2, 1\].*got 2"):
        fusedformer.softmax(x, 2)
    with pytest.raises(ValueError, match="x must not be empty"):
        fusedformer.softmax(torch.ones(0, 8))
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        fusedformer.softmax(torch.tensor(1.0))
    with pytest.raises(ValueError, match="is_causal needs an x of at least 2 dimensions"):
        fusedformer.softmax(torch.ones(8), is_causal=True)
    with pytest.raises(RuntimeError, match="mask must be on the device of x"):
        fusedformer.softmax(x.to("meta"), mask=torch.ones(8, dtype=torch.bool))
    y = fusedformer.softmax(x)
    with pytest.raises(TypeError, match="grad_output must have the dtype of output"):
        _ops.softmax_bwd(y.double(), y, -1, 1.0)
    with pytest.raises(ValueError, match="grad_output must have the output's shape"):
        _ops.softmax_bwd(y[:2], y, -1, 1.0)

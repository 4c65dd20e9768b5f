"""fusedformer.ops.layer_norm / rms_norm: values and gradients (input, weight, bias) against float64,
the fused residual form, every instruction set, opcheck, torch.compile and the error messages."""

import pytest
import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from _util import DEVICES, ISAS, LOWP, assert_matches_reference, cpu_isa, make

_ops = torch.ops.fusedformer


def _rms64(x, shape, w, eps):
    dims = tuple(range(-len(shape), 0))
    out = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return out * w if w is not None else out


def _ref_grads(rms, x, shape, w, b, eps, residual, g, gh):
    """float64 gradients (input, weight, bias, residual) by autograd through the float64 formula."""
    h = x.detach() + residual.detach() if residual is not None else x.detach()
    h64 = h.double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if w is not None else None
    b64 = b.detach().double().requires_grad_() if b is not None else None
    if rms:
        out = _rms64(h64, shape, w64, eps)
    else:
        out = F.layer_norm(h64, shape, w64, b64, eps)
    loss = (out * g.double()).sum()
    if gh is not None:
        loss = loss + (h64 * gh.double()).sum()
    loss.backward()
    return h64.grad, (w64.grad if w is not None else None), (b64.grad if b is not None else None)


def _call(rms, x, shape, w, b, eps, residual):
    if rms:
        return fusedformer.rms_norm(x, shape, w, eps, residual=residual)
    return fusedformer.layer_norm(x, shape, w, b, eps, residual=residual)


def _ref(rms, x, shape, w, b, eps, residual):
    if rms:
        return ref.rms_norm(x, shape, w, eps, residual=residual)
    return ref.layer_norm(x, shape, w, b, eps, residual=residual)


def _peer(rms, x, shape, w, b, eps, residual):
    h = x + residual if residual is not None else x
    out = F.rms_norm(h, shape, w, eps) if rms else F.layer_norm(h, shape, w, b, eps)
    return (out, h) if residual is not None else out


def _check(rms, x, shape, *, weight=True, bias=True, residual=False, dtype=torch.float32, isa=None, eps=1e-5,
           wscale=1.0):
    """Forward and backward of ours against float64 (and PyTorch's run at the same precision)."""
    n = shape[-1] if isinstance(shape, tuple) else shape
    shape = tuple(shape) if isinstance(shape, tuple) else (shape,)
    x = x.to(dtype)
    w = (1.0 + wscale * make(shape)).to(dtype) if weight else None
    b = make(shape).to(dtype) if bias and not rms else None
    r = make(x.shape, dtype, seed=7) if residual else None
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    peers = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    with cpu_isa(isa or ISAS[-1]):
        out = _call(rms, leaves[0], shape, leaves[1], leaves[2], eps, leaves[3])
    want = _ref(rms, x, shape, w, b, eps, r)
    lowp = dtype in LOWP
    peer = _peer(rms, peers[0], shape, peers[1], peers[2], eps, peers[3]) if lowp else None
    if residual:
        y, h = out
        assert_matches_reference(y, want[0], peer[0] if lowp else None, rtol=1e-5, atol=2e-5, what="out")
        assert torch.equal(h, x + r), "residual_out must equal input + residual"
    else:
        y = out
        assert_matches_reference(y, want, peer, rtol=1e-5, atol=2e-5, what="out")
    assert y.dtype == dtype and y.shape == x.shape
    # backward, with a gradient into the residual output too
    g = make(x.shape, dtype, seed=3)
    gh = make(x.shape, dtype, seed=4) if residual else None
    with cpu_isa(isa or ISAS[-1]):
        torch.autograd.backward([y, h] if residual else [y], [g, gh] if residual else [g])
    if lowp:
        torch.autograd.backward([peer[0], peer[1]] if residual else [peer], [g, gh] if residual else [g])
    gx, gw, gb = _ref_grads(rms, x, shape, w, b, eps, r, g, gh)
    tol = dict(rtol=1e-4, atol=1e-4)  # float32 gradients: sums over a row / over the rows
    names = ["grad input", "grad weight", "grad bias", "grad residual"]
    for i, want_g in [(0, gx), (1, gw), (2, gb), (3, gx if residual else None)]:
        if leaves[i] is None:
            continue
        assert want_g is not None
        assert leaves[i].grad is not None, names[i]
        assert leaves[i].grad.dtype == leaves[i].dtype
        scale = max(1.0, want_g.abs().max().item())
        assert_matches_reference(leaves[i].grad, want_g, peers[i].grad if lowp else None,
                                 rtol=tol["rtol"], atol=tol["atol"] * scale, what=names[i])
    return y


NORMS = [pytest.param(False, id="layer_norm"), pytest.param(True, id="rms_norm")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
@pytest.mark.parametrize("shape", [(6, 1), (5, 3), (4, 17), (3, 1000), (2, 4097), (4097,), (2, 3, 4, 40)])
def test_shapes(isa, rms, shape):
    _check(rms, make(shape, scale=2.0) + 0.5, shape[-1], isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_params_optional(isa, rms, weight, bias):
    _check(rms, make((5, 3, 37)), 37, weight=weight, bias=bias, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
def test_multi_dim_normalized_shape(isa, rms):
    _check(rms, make((4, 3, 5, 7)), (5, 7), isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
def test_noncontiguous(isa, rms):
    _check(rms, make((6, 74))[:, ::2], 37, isa=isa)
    _check(rms, make((33, 9)).t(), 33, residual=True, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
@pytest.mark.parametrize("shape", [(7, 1), (5, 17), (3, 1000), (2, 3, 40)])
def test_residual(isa, rms, shape):
    _check(rms, make(shape), shape[-1], residual=True, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
def test_large(isa, rms):
    # outputs over the streaming-store threshold; row length not a multiple of the vector width
    _check(rms, make((1100, 1001)), 1001, residual=True, isa=isa)
    _check(rms, make((600, 2048)), 2048, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
def test_large_mean_small_variance(isa, rms):
    # a large common offset costs no more precision than in PyTorch's float32 kernels
    x = (make((8, 300), torch.float64, scale=0.01) + 1000.0).float()
    w, b = make((300,)), make((300,))
    with cpu_isa(isa):
        ours = fusedformer.rms_norm(x, 300, w) if rms else fusedformer.layer_norm(x, 300, w, b)
    peer = F.rms_norm(x, (300,), w) if rms else F.layer_norm(x, (300,), w, b)
    want = ref.rms_norm(x, 300, w) if rms else ref.layer_norm(x, 300, w, b)
    ours_err = (ours.double() - want).abs().max().item()
    peer_err = (peer.double() - want).abs().max().item()
    assert ours_err <= 2 * peer_err + 1e-5, (ours_err, peer_err)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rms", NORMS)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("residual", [False, True])
def test_low_precision(isa, rms, dtype, residual):
    _check(rms, make((64, 100)), 100, dtype=dtype, residual=residual, isa=isa, wscale=0.3)
    _check(rms, make((3, 1030)), 1030, dtype=dtype, residual=residual, isa=isa, wscale=0.3)


def test_float32_params_with_low_precision_input():
    x = make((4, 24), torch.bfloat16, requires_grad=True)
    w = make((24,), requires_grad=True)
    b = make((24,), requires_grad=True)
    y = fusedformer.layer_norm(x, 24, w, b)
    assert y.dtype == torch.bfloat16
    assert_matches_reference(y, ref.layer_norm(x, 24, w, b), F.layer_norm(x.detach(), (24,), w.detach(),
                                                                           b.detach()))
    y.sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_eps():
    x = make((3, 40), scale=1e-3)
    for rms in [False, True]:
        _check(rms, x, 40, eps=1e-2)
    # rms_norm's default eps is that of the input dtype, as in F.rms_norm
    torch.testing.assert_close(fusedformer.rms_norm(x, 40), F.rms_norm(x, (40,)))


def test_float64_gradcheck():
    x = make((3, 2, 6), torch.float64, requires_grad=True)
    r = make((3, 2, 6), torch.float64, requires_grad=True)
    w = make((6,), torch.float64, requires_grad=True)
    b = make((6,), torch.float64, requires_grad=True)
    w2 = make((2, 6), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: fusedformer.layer_norm(x, 6, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: fusedformer.layer_norm(x, (2, 6), w), (x, w2))
    assert torch.autograd.gradcheck(lambda x, r, w, b: fusedformer.layer_norm(x, 6, w, b, residual=r), (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x, w: fusedformer.rms_norm(x, 6, w, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda x, r, w: fusedformer.rms_norm(x, 6, w, residual=r), (x, r, w))
    assert torch.autograd.gradcheck(lambda x: fusedformer.rms_norm(x, (2, 6)), (x,))


# ---------------------------------------------------------------------------------------------
# op registration, compile, devices


def test_opcheck():
    x = make((4, 2, 9))
    r = make((4, 2, 9))
    w, b = make((9,)), make((9,))
    for args in [(x, [9], w, b, 1e-5, None), (x, [2, 9], None, None, 1e-5, r), (x, [9], w, None, 1e-3, r)]:
        torch.library.opcheck(_ops.layer_norm_fwd.default, args)
    for args in [(x, [9], w, 1e-5, None), (x, [2, 9], None, 1e-6, r)]:
        torch.library.opcheck(_ops.rms_norm_fwd.default, args)
    g = torch.randn_like(x)
    _, _, mean, rstd = _ops.layer_norm_fwd(x, [9], w, b, 1e-5, None)
    torch.library.opcheck(_ops.layer_norm_bwd.default, (g, None, x, mean, rstd, w, True, [9]))
    torch.library.opcheck(_ops.layer_norm_bwd.default, (g, r, x, mean, rstd, None, False, [9]))
    _, _, rstd = _ops.rms_norm_fwd(x, [9], w, 1e-5, None)
    torch.library.opcheck(_ops.rms_norm_bwd.default, (g, None, x, rstd, w, [9]))
    torch.library.opcheck(_ops.rms_norm_bwd.default, (g, r, x, rstd, None, [9]))


def test_compile_fullgraph():
    def block(x, r, w, b):
        y, h = fusedformer.layer_norm(x, 16, w, b, residual=r)
        z, _ = fusedformer.rms_norm(y * 2.0, 16, w, 1e-6, residual=h)
        return z

    args = [make((3, 5, 16), requires_grad=True) for _ in range(2)] + [make((16,), requires_grad=True)] * 2
    got = torch.compile(block, fullgraph=True)(*args)
    want = block(*[a.detach() for a in args])
    torch.testing.assert_close(got.detach(), want)
    got.sum().backward()
    assert all(a.grad is not None and not torch.isnan(a.grad).any() for a in args)


@pytest.mark.parametrize("device", DEVICES)
def test_devices(device):
    x = make((5, 64), device=device)
    r = make((5, 64), device=device)
    w, b = make((64,), device=device), make((64,), device=device)
    y, h = fusedformer.layer_norm(x, 64, w, b, residual=r)
    assert y.device == x.device and h.device == x.device
    assert_matches_reference(y.cpu(), ref.layer_norm(x, 64, w, b, residual=r)[0], atol=2e-5)
    y = fusedformer.rms_norm(x, 64, w)
    assert_matches_reference(y.cpu(), ref.rms_norm(x, 64, w), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# errors name the argument


@pytest.mark.parametrize("rms", NORMS)
def test_errors(rms):
    def call(x, shape=8, w=None, b=None, eps=1e-5, residual=None):
        if rms:
            return fusedformer.rms_norm(x, shape, w, eps, residual=residual)
        return fusedformer.layer_norm(x, shape, w, b, eps, residual=residual)

    x = make((4, 8))
    with pytest.raises(TypeError, match="input must be float32"):
        call(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"residual must have the dtype of input \(Float\), got BFloat16"):
        call(x, residual=x.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"residual must have the input's shape \[4, 8\], got \[1, 8\]"):
        call(x, residual=x[:1])
    with pytest.raises(ValueError, match=r"weight must have shape \[8\] \(normalized_shape\), got \[7\]"):
        call(x, w=torch.ones(7))
    with pytest.raises(TypeError, match="weight must be float32"):
        call(x, w=torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"normalized_shape \[5\] must match the trailing dimensions of input"):
        call(x, 5)
    with pytest.raises(ValueError, match="input must not be empty"):
        call(torch.ones(0, 8))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        call(x, eps=-1.0)
    with pytest.raises(RuntimeError, match="residual must be on the device of input"):
        call(x.to("meta"), residual=x)
    if not rms:
        with pytest.raises(ValueError, match=r"bias must have shape \[8\] \(normalized_shape\), got \[4, 8\]"):
            call(x, b=torch.ones(4, 8))

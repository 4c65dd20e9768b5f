"""fusedformer.ops.gelu: values and gradients against float64 for both forms (exact and tanh), every
dtype and instruction set, awkward shapes, large and special values, gradcheck, opcheck,
torch.compile, the models' MLP and the error messages."""

import pytest
import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from _util import CUDA, DEVICES, ISAS, LOWP, assert_matches_reference, cpu_isa, make, skip_unless_cuda

_ops = torch.ops.fusedformer

APPROX = ["none", "tanh"]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _tol(dtype, device):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    # float32: within ~1e-6 of float64 on the CPU; the CUDA build uses fast exp and division
    return dict(rtol=1e-6, atol=1e-6) if device == "cpu" else dict(rtol=1e-5, atol=1e-5)


def _ref_grad(x, g, approximate):
    """float64 gradient by autograd through torch's float64 GELU."""
    x64 = x.detach().cpu().double().requires_grad_()
    F.gelu(x64, approximate=approximate).backward(g.detach().cpu().double())
    return x64.grad


def _check(x, approximate, *, isa=None, device="cpu"):
    """Forward and backward of ours against float64 (and, in low precision, PyTorch's own run)."""
    dtype = x.dtype
    leaf = x.detach().to(device).requires_grad_()
    with cpu_isa(isa or ISAS[-1]):
        y = fusedformer.ops.gelu(leaf, approximate)
    assert y.dtype == dtype and y.shape == x.shape and y.device == leaf.device
    assert y.is_contiguous()
    lowp = dtype in LOWP and x.numel() > 0  # (the 2 x PyTorch rule needs an error to compare)
    tol = _tol(dtype, device)
    xc = x.detach().cpu()
    peer = F.gelu(xc, approximate=approximate) if lowp else None
    assert_matches_reference(y.detach().cpu(), ref.gelu(xc, approximate), peer, **tol, what=f"gelu {approximate}")
    g = make(x.shape or (1,), dtype, seed=3).reshape(x.shape)
    with cpu_isa(isa or ISAS[-1]):
        y.backward(g.to(device))
    peer_g = torch.ops.aten.gelu_backward(g, xc, approximate=approximate) if lowp else None
    assert leaf.grad.dtype == dtype and leaf.grad.shape == x.shape
    assert_matches_reference(leaf.grad.cpu(), _ref_grad(xc, g, approximate), peer_g, **tol,
                             what=f"gelu {approximate} grad")


SHAPES = [(), (0,), (3, 0, 2), (1,), (17,), (1023,), (3, 1023), (2, 3, 40)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_grads(isa, approximate, dtype, shape):
    _check(make(shape or (1,), dtype, scale=3.0).reshape(shape), approximate, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_noncontiguous(isa, approximate, dtype):
    _check(make((6, 37), dtype, scale=3.0, noncontig=True), approximate, isa=isa)
    _check(make((33, 9), dtype, scale=3.0).t(), approximate, isa=isa)
    _check(make((1, 19), dtype, scale=3.0).expand(4, 19), approximate, isa=isa)  # stride 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large(isa, approximate, dtype):
    # outputs over the streaming-store threshold, split over the threads; an input that starts
    # off a cache line (the output is freshly allocated, aligned)
    _check(make((1100, 1001), dtype, scale=3.0), approximate, isa=isa)
    _check(make((1100 * 1001 + 3,), dtype, scale=3.0)[3:], approximate, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("approximate", APPROX)
def test_float32_accuracy_dense(isa, approximate):
    """Every float32 result on a dense grid over the whole range where GELU is not 0 or x, plus
    the tails, within 1e-6 (absolute or relative) of float64."""
    x = torch.cat([torch.linspace(-12.0, 12.0, 240001), torch.logspace(-30, 1, 301), -torch.logspace(-30, 1, 301)])
    g = torch.ones_like(x)
    with cpu_isa(isa):
        y = _ops.gelu(x, approximate)
        gx = _ops.gelu_bwd(g, x, approximate)
    torch.testing.assert_close(y.double(), ref.gelu(x, approximate), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.double(), _ref_grad(x, g, approximate), rtol=1e-6, atol=1e-6)


SPECIAL = [float("-inf"), -1e30, -1e20, -1e13, -1e4, -30.0, -10.0, -9.0, -5.0, -1e-30, -0.0, 0.0, 1e-40, 1e-30,
           5.0, 9.0, 10.0, 30.0, 1e4, 1e13, 1e20, 1e30, float("inf"), float("nan")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_large_and_special_values(isa, approximate, dtype):
    """Large |x| neither overflows into NaN nor loses the limits (gelu(x) = x for large positive x,
    -0 for large negative x, gradients 1 and 0); inf and NaN follow torch's float64 GELU:
    gelu(inf) = inf, gelu(-inf) = NaN, NaN in NaN out, the gradient NaN at +-inf and NaN."""
    # every vector lane position gets the specials (they are repeated past the widest vector)
    x = torch.tensor(SPECIAL * 3, dtype=torch.float64).to(dtype)
    g = torch.ones_like(x)
    with cpu_isa(isa):
        y = _ops.gelu(x, approximate)
        gx = _ops.gelu_bwd(g, x, approximate)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(y, ref.gelu(x, approximate).to(dtype), equal_nan=True, **tol)
    torch.testing.assert_close(gx, _ref_grad(x, g, approximate).to(dtype), equal_nan=True, **tol)


@pytest.mark.parametrize("approximate", APPROX)
def test_float64_gradcheck(approximate):
    x = make((3, 7), torch.float64, scale=2.0, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fusedformer.ops.gelu(t, approximate), (x,))


def test_double_backward_raises():
    x = make((4, 5), torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(fusedformer.ops.gelu(x, "tanh").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fusedformer::gelu_bwd: double backward"):
        gx.sum().backward()


def test_default_is_exact():
    x = make((5, 8))
    torch.testing.assert_close(fusedformer.ops.gelu(x), _ops.gelu(x, "none"), rtol=0, atol=0)
    torch.testing.assert_close(fusedformer.ops.gelu(x, approximate="tanh"), _ops.gelu(x, "tanh"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# op registration, compile, devices


def test_opcheck():
    x = make((4, 2, 9))
    g = make((4, 2, 9), seed=5)
    for approximate in APPROX:
        torch.library.opcheck(_ops.gelu.default, (x, approximate))
        torch.library.opcheck(_ops.gelu.default, (x.to(torch.bfloat16).transpose(0, 2), approximate))
        torch.library.opcheck(_ops.gelu_bwd.default, (g, x, approximate))
        torch.library.opcheck(_ops.gelu_bwd.default, (g.to(torch.float16), x.to(torch.float16), approximate))
    torch.library.opcheck(_ops.gelu.default, (x.new_empty((0, 3)), "tanh"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (17,), (3, 1023), (1100, 1001)], ids=str)
def test_inplace_equals_out_of_place(isa, approximate, dtype, shape):
    x = make(shape, dtype=dtype, seed=3) * 4
    with cpu_isa(isa):
        want = fusedformer.ops.gelu(x, approximate)
        y = x.clone()
        with torch.no_grad():
            got = fusedformer.ops.gelu_(y, approximate)
    assert got is y
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_inplace_op_and_errors():
    x = make((4, 2, 9))
    torch.library.opcheck(_ops.gelu_.default, (x.clone(), "tanh"))
    torch.library.opcheck(_ops.gelu_.default, (x.clone().to(torch.bfloat16), "none"))
    with pytest.raises(ValueError, match="input must be contiguous"):
        fusedformer.ops.gelu_(x.transpose(0, 2), "tanh")
    with pytest.raises(RuntimeError, match="has no backward"):
        fusedformer.ops.gelu_(x.clone().requires_grad_(), "tanh")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        fusedformer.ops.gelu_(x.clone(), "fast")
    with pytest.raises(TypeError, match="input must be"):
        fusedformer.ops.gelu_(x.int(), "tanh")

    def f(t):
        return fusedformer.ops.gelu_(t * 2.0, "tanh") + 1

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), fusedformer.ops.gelu(x * 2.0, "tanh") + 1)


def test_compile_fullgraph():
    def f(x):
        return fusedformer.ops.gelu(x * 2.0, approximate="tanh") + fusedformer.ops.gelu(x)

    x = make((3, 5, 16), requires_grad=True)
    got = torch.compile(f, fullgraph=True)(x)
    want = f(x.detach())
    torch.testing.assert_close(got.detach(), want)
    got.sum().backward()
    x2 = x.detach().double().requires_grad_()
    (F.gelu(x2 * 2.0, approximate="tanh") + F.gelu(x2)).sum().backward()
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", APPROX)
def test_devices(device, approximate):
    _check(make((5, 67), scale=3.0), approximate, device=device)


@skip_unless_cuda()
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (17,), (1023,), (3, 1023), (1100, 1001)], ids=str)
def test_cuda(approximate, dtype, shape):
    _check(make(shape, dtype, scale=3.0), approximate, device="cuda")


@skip_unless_cuda()
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_layouts(approximate, dtype):
    _check(make((1100, 1001), dtype, scale=3.0).t(), approximate, device="cuda")
    # an input off the 16-byte boundary takes the element-wise path
    _check(make((1001 * 3 + 1,), dtype, scale=3.0)[1:], approximate, device="cuda")


@skip_unless_cuda()
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_special_values(approximate, dtype):
    x = torch.tensor(SPECIAL, dtype=torch.float64).to(dtype)
    g = torch.ones_like(x)
    y = _ops.gelu(x.cuda(), approximate).cpu()
    gx = _ops.gelu_bwd(g.cuda(), x.cuda(), approximate).cpu()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(y, ref.gelu(x, approximate).to(dtype), equal_nan=True, **tol)
    torch.testing.assert_close(gx, _ref_grad(x, g, approximate).to(dtype), equal_nan=True, **tol)


# ---------------------------------------------------------------------------------------------
# the models' MLP


@pytest.mark.parametrize("activation,approximate", [("gelu_tanh", "tanh"), ("gelu", "none")])
def test_mlp(activation, approximate):
    """The MLP with the fused GELU gives what the same weights give with F.gelu, in training and
    in inference."""
    from fusedformer.models.blocks import MLP

    mlp = MLP(16, 48, activation)
    x = make((2, 5, 16), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    def plain(t):
        return mlp.down(F.gelu(mlp.up(t), approximate=approximate))

    with torch.no_grad():
        torch.testing.assert_close(mlp(x), plain(x), rtol=1e-5, atol=1e-6)
    got, want = mlp(x), plain(x_ref)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = make(got.shape, seed=9)
    got_grads = torch.autograd.grad(got, [x, *mlp.parameters()], g)
    want_grads = torch.autograd.grad(want, [x_ref, *mlp.parameters()], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# errors name the argument


def test_errors():
    x = make((4, 8))
    with pytest.raises(TypeError, match="fusedformer.gelu: input must be a torch.Tensor, got list"):
        fusedformer.ops.gelu([1.0, 2.0])
    with pytest.raises(TypeError, match=r"fusedformer.gelu: approximate must be a str \('none' or 'tanh'\), got NoneType"):
        fusedformer.ops.gelu(x, None)
    with pytest.raises(ValueError, match="fusedformer.gelu: approximate must be 'none' or 'tanh', got 'sigmoid'"):
        fusedformer.ops.gelu(x, "sigmoid")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'Tanh'"):
        _ops.gelu_bwd(x, x, "Tanh")
    with pytest.raises(TypeError, match="fusedformer.gelu: input must be float32, bfloat16, float16 or float64, got Int"):
        fusedformer.ops.gelu(torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"grad must have the dtype of input \(Float\), got BFloat16"):
        _ops.gelu_bwd(x.to(torch.bfloat16), x, "none")
    with pytest.raises(ValueError, match=r"grad must have the input's shape \[4, 8\], got \[1, 8\]"):
        _ops.gelu_bwd(x[:1], x, "tanh")
    with pytest.raises(TypeError, match="input must be float32"):
        _ops.gelu_bwd(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), "none")
    # meta tensors: the fake implementations refuse the same arguments
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'sigmoid'"):
        _ops.gelu(x.to("meta"), "sigmoid")
    with pytest.raises(RuntimeError, match="grad must be on the device of input"):
        _ops.gelu_bwd(x, x.to("meta"), "none")
    with pytest.raises(ValueError, match=r"grad must have the input's shape \[4, 8\], got \[1, 8\]"):
        _ops.gelu_bwd(x[:1].to("meta"), x.to("meta"), "none")
    if CUDA:
        with pytest.raises(RuntimeError, match="grad must be on the device of input"):
            _ops.gelu_bwd(x, x.cuda(), "none")

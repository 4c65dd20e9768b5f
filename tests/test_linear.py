"""fusedformer.ops.linear and the fusedformer::linear kernel: values against float64 for every dtype,
row count (the register tile's remainders), feature count (the vector tails), bias or not, strided
inputs and every instruction set; gradients, opcheck, torch.compile, autocast, nn.Linear parity and
the error messages."""

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedformer
from _util import DEVICES, DTYPES, ISAS, LOWP, assert_matches_reference, cpu_isa, make

_ops = torch.ops.fusedformer
_linear_mod = sys.modules["fusedformer.ops.linear"]


def _check(M, N, K, dtype, *, bias=True, device="cpu", noncontig=False, lead=(), seed=0):
    x = make((*lead, M, K), dtype, device, seed=seed, noncontig=noncontig)
    w = make((N, K), dtype, device, seed=seed + 1, scale=K ** -0.5)
    b = make((N,), dtype, device, seed=seed + 2) if bias else None
    got = _ops.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    peer = F.linear(x.float(), w.float(), b.float() if bias else None).to(dtype) if dtype in LOWP else None
    assert got.dtype == dtype and got.shape == (*lead, M, N) and got.is_contiguous()
    assert_matches_reference(got, ref, peer, rtol=2e-5, atol=2e-5, what=f"linear {dtype} M={M} N={N} K={K}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33])
def test_rows_and_tails(isa, dtype, M):
    with cpu_isa(isa):
        for N, K in [(1, 1), (5, 7), (7, 33), (13, 64), (50, 100), (97, 257)]:
            _check(M, N, K, dtype, bias=(N % 2 == 1), seed=M * 100 + N)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_large_and_blocked(isa, dtype):
    # more W rows than one L2 block, K a multiple of the vector width and not
    with cpu_isa(isa):
        _check(6, 1031, 768, dtype)
        _check(1, 3000, 131, dtype, bias=False)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_batched_input(device):
    _check(5, 11, 40, torch.float32, device=device, noncontig=True)
    _check(3, 9, 24, torch.float32, device=device, lead=(2, 3))
    x = make((8, 6, 32), seed=3, device=device).transpose(0, 1)  # rows not evenly spaced
    w = make((10, 32), seed=4, device=device)
    torch.testing.assert_close(_ops.linear(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_empty_and_nonfinite():
    w = make((4, 8), seed=1)
    assert _ops.linear(torch.empty(0, 8), w, None).shape == (0, 4)
    out = _ops.linear(torch.randn(2, 0), torch.randn(3, 0), torch.arange(3.0))
    torch.testing.assert_close(out, torch.arange(3.0).expand(2, 3))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    x[2, 5] = float("inf")
    got = _ops.linear(x, w, None)
    ref = F.linear(x, w)
    assert torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()
    torch.testing.assert_close(got, ref, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients(dtype):
    x = make((3, 5, 9), dtype, requires_grad=True, seed=5)
    w = make((7, 9), dtype, requires_grad=True, seed=6)
    b = make((7,), dtype, requires_grad=True, seed=7)
    g = make((3, 5, 7), dtype, seed=8)
    _ops.linear(x, w, b).backward(g)
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x, w, b).backward(g)
    for ours, ref in zip(grads, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda *a: _ops.linear(*a), (x, w, b))
        assert torch.autograd.gradcheck(lambda a, c: _ops.linear(a, c, None), (x, w))


def test_opcheck():
    x, w, b = make((4, 16), seed=1), make((6, 16), seed=2), make((6,), seed=3)
    torch.library.opcheck(_ops.linear.default, (x, w, b))
    torch.library.opcheck(_ops.linear.default, (x.requires_grad_(), w.requires_grad_(), None))


def test_compile_fullgraph():
    x, w, b = make((2, 16), seed=1), make((6, 16), seed=2), make((6,), seed=3)
    got = torch.compile(lambda a: fusedformer.linear(a, w, b).relu(), fullgraph=True)(x)
    torch.testing.assert_close(got, F.linear(x, w, b).relu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tuned_blas", [False, True])
def test_dispatch_rule(monkeypatch, isa, tuned_blas):
    """Few rows take the op; float32 from GEMM_ROWS rows on takes it on AVX2 / AVX-512 (the blocked
    product) unless the BLAS product is tuned for the CPU, F.linear on the generic build; rows in
    between and float64 above SMALL_ROWS take F.linear; bfloat16 / float16 take the op up to
    HALF_ROWS (every input where that is None)."""
    calls = []
    real = _linear_mod._ops.linear

    class Spy:
        def linear(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(_linear_mod, "_ops", Spy())
    monkeypatch.setattr(_linear_mod, "BLAS_SGEMM_TUNED", tuned_blas)
    w = make((6, 16), seed=2)

    def taken(x):
        before = len(calls)
        torch.testing.assert_close(fusedformer.linear(x, w.to(x.dtype)), F.linear(x, w.to(x.dtype)),
                                   rtol=1e-2 if x.dtype in (torch.bfloat16, torch.float16) else 1e-5, atol=1e-2)
        return len(calls) > before

    try:
        _check_dispatch(isa, tuned_blas, taken)
    finally:
        monkeypatch.undo()
        _linear_mod._capability_changed()  # the flag as the real BLAS_SGEMM_TUNED sets it


def _check_dispatch(isa, tuned_blas, taken):
    with cpu_isa(isa):
        assert _linear_mod._gemm == (isa in _linear_mod._GEMM_ISAS and not tuned_blas)
        assert taken(make((_linear_mod.SMALL_ROWS, 16)))
        assert not taken(make((2, _linear_mod.SMALL_ROWS, 16)))
        assert taken(make((_linear_mod.GEMM_ROWS, 16))) == _linear_mod._gemm
        assert not taken(make((_linear_mod.GEMM_ROWS, 16)).double())
        for dt, limit in _linear_mod.HALF_ROWS.items():
            assert taken(make((1, 16)).to(dt))
            assert taken(make((_linear_mod.GEMM_ROWS, 16)).to(dt)) == (limit is None)
            if limit is not None:
                assert taken(make((limit, 16)).to(dt)) and not taken(make((limit + 1, 16)).to(dt))


# The blocked float32 product (more than 16 rows): register-tile and block remainders in every
# dimension (rows: tiles of 6 and blocks of up to 144; columns: panels of 2 vectors and blocks of 96
# panels; K: blocks of up to 384), transposed and strided operands read through their strides.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,N,K", [(17, 1, 1), (17, 5, 7), (23, 33, 65), (145, 47, 385), (300, 17, 800),
                                   (37, 3100, 20), (1000, 70, 48)])
def test_blocked_product(isa, M, N, K):
    with cpu_isa(isa):
        _check(M, N, K, torch.float32, bias=(N % 2 == 1), seed=M + N + K)


@pytest.mark.parametrize("isa", ISAS)
def test_blocked_product_strides(isa):
    with cpu_isa(isa):
        x = make((70, 90), seed=1)
        w = make((50, 90), seed=2)
        b = make((50,), seed=3)
        for xs in (x, x.t().contiguous().t(), make((70, 180), seed=1)[:, ::2]):
            for ws in (w, w.t().contiguous().t(), make((100, 90), seed=2)[::2]):
                got = _ops.linear(xs, ws, b)
                ref = F.linear(xs.double(), ws.double(), b.double())
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        # an expanded (stride 0) input and a batch whose rows are not evenly spaced
        e = make((1, 90), seed=4).expand(40, 90)
        torch.testing.assert_close(_ops.linear(e, w, None).double(), F.linear(e.double(), w.double()),
                                   rtol=1e-5, atol=1e-5)
        t = make((8, 6, 90), seed=5).transpose(0, 1)
        torch.testing.assert_close(_ops.linear(t, w, b), F.linear(t, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blocked_product_threads(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(20, 200, 64, torch.float32)  # one row block: the columns are split over the threads
        _check(600, 130, 400, torch.float32, bias=False)
    finally:
        torch.set_num_threads(before)


def test_blocked_product_gradients():
    """The backward takes the input gradient through the op (weight.T read in place)."""
    x = make((4, 10, 33), requires_grad=True, seed=5)
    w = make((21, 33), requires_grad=True, seed=6)
    b = make((21,), requires_grad=True, seed=7)
    g = make((4, 10, 21), seed=8)
    fusedformer.linear(x, w, b).backward(g)
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    F.linear(x.double(), w.double(), b.double()).backward(g.double())
    for ours, ref in zip(grads, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _spy_op_calls(monkeypatch):
    """The shapes of the op's input at each call the Python layer makes of fusedformer::linear."""
    calls = []
    real = _linear_mod._ops.linear

    class Spy:
        def linear(self, *a):
            calls.append(tuple(a[0].shape))
            return real(*a)

    monkeypatch.setattr(_linear_mod, "_ops", Spy())
    return calls


@pytest.mark.parametrize("gemm", [False, True])
def test_weight_gradient_product(monkeypatch, gemm):
    """The weight gradient ``grad.T @ input`` (a reduction over the rows) takes the blocked product
    where the forward does, reading both operands transposed through their strides, and torch's
    product otherwise; the values are float64's either way."""
    calls = _spy_op_calls(monkeypatch)
    monkeypatch.setattr(_linear_mod, "_gemm", gemm)
    M, N, K = _linear_mod.GEMM_ROWS + 37, _linear_mod.GEMM_ROWS + 5, 70
    x = make((M + 3, K), seed=1)[3:].requires_grad_()  # a storage offset
    w = make((N, K), seed=2, scale=K ** -0.5).requires_grad_()
    b = make((N,), seed=3).requires_grad_()
    g = make((N, M), seed=4).t()  # a transposed output gradient
    fusedformer.linear(x, w, b).backward(g)
    assert ((N, M) in calls) == gemm  # grad.T (N, M) as the op's input
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).backward(g.double())
    for ours, ref in zip((x.grad, w.grad, b.grad), (xd.grad, wd.grad, bd.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)
    # too few rows for the blocked product: torch's
    calls.clear()
    small = make((8, K), seed=5).requires_grad_()
    fusedformer.linear(small, w, b).backward(make((8, N), seed=6))
    assert (N, 8) not in calls


@contextlib.contextmanager
def _bf16_precision():
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def _bf16_ref(x, w, b=None):
    """float64 product of the operands rounded to bfloat16 (what the bf16 products compute)."""
    r = x.bfloat16().double() @ w.bfloat16().double().T
    return r if b is None else r + b.double()


# bfloat16 products (torch.backends.mkldnn.matmul.fp32_precision = "bf16", AVX512-BF16): operands
# rounded to bfloat16 as they are copied into the panels, products summed in float32. Shapes cover the
# paired copies' fast path (K a multiple of 32, rows along K), their other paths (odd K, K blocks
# over 384, transposed and strided operands), row / column tiles' remainders, bias or not.
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,N,K", [(17, 5, 7), (23, 33, 64), (145, 47, 385), (300, 17, 800), (600, 70, 96),
                                   (37, 3100, 33)])
def test_bf16_products(isa, M, N, K):
    x = make((M, K), seed=M)
    w = make((N, K), seed=N, scale=K ** -0.5)
    b = make((N,), seed=K) if N % 2 else None
    full = _ops.linear(x, w, b)
    with cpu_isa(isa), _bf16_precision():
        got = _ops.linear(x, w, b)
        assert _linear_mod.bf16_products() == (_linear_mod._gemm_bf16 and fusedformer.cpu_capability() == "avx512")
        bf16 = isa == "avx512" and "avx512_bf16" in _linear_mod._FLAGS and M > 16
        ref = _bf16_ref(x, w, b) if bf16 else F.linear(x.double(), w.double(), None if b is None else b.double())
        # float32 sums of exact products: float32 rounding of K terms of size ~1 / sqrt(K)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        if bf16:  # the float32 product is not what it computed: bfloat16's rounding shows
            assert (full.double() - ref).abs().max() > 1e-3
        for xs in (x.t().contiguous().t(), make((M, 2 * K), seed=M)[:, ::2]):
            ws = make((2 * N, K), seed=N, scale=K ** -0.5)[::2]
            torch.testing.assert_close(_ops.linear(xs, ws, b).double(),
                                       _bf16_ref(xs, ws, b) if bf16 else F.linear(xs.double(), ws.double(),
                                                                                  None if b is None else b.double()),
                                       rtol=1e-5, atol=1e-5)
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    torch.testing.assert_close(_ops.linear(x, w, b), full, rtol=0, atol=0)


def test_bf16_products_gradients(monkeypatch):
    """Under the bfloat16 precision the input and weight gradients of a training-sized layer (768 rows,
    128 -> 384) take the op's blocked product, with bfloat16 products and float32 sums where the
    build and CPU have them (AVX-512, AVX512-BF16) and float32 products elsewhere (the routing forced
    on where the blocked product would not be taken)."""
    hardware = _linear_mod._gemm_bf16
    monkeypatch.setattr(_linear_mod, "_gemm", True)
    monkeypatch.setattr(_linear_mod, "_gemm_bf16", True)
    calls = _spy_op_calls(monkeypatch)
    x = make((768, 128), seed=1).requires_grad_()
    w = make((384, 128), seed=2, scale=128 ** -0.5).requires_grad_()
    g = make((768, 384), seed=3)
    with _bf16_precision():
        fusedformer.linear(x, w).backward(g)
    assert (384, 768) in calls and (768, 384) in calls  # grad.T @ input and grad @ weight
    rnd = (lambda t: t.detach().bfloat16().double()) if hardware else (lambda t: t.detach().double())
    torch.testing.assert_close(x.grad.double(), rnd(g) @ rnd(w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), rnd(g).T @ rnd(x), rtol=1e-5, atol=1e-4)
    # at the default precision: float32 products, torch's for this weight gradient
    calls.clear()
    x.grad = w.grad = None
    fusedformer.linear(x, w).backward(g)
    assert (384, 768) not in calls
    torch.testing.assert_close(w.grad.double(), g.double().T @ x.detach().double(), rtol=1e-5, atol=1e-4)


def test_autocast():
    x, w, b = make((3, 16), seed=1), make((6, 16), seed=2), make((6,), seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _ops.linear(x, w, b)
    assert got.dtype == torch.bfloat16
    ref = F.linear(x.bfloat16().float(), w.bfloat16().float(), b.bfloat16().float())
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)


def test_nn_linear_drop_in():
    torch.manual_seed(0)
    tl = torch.nn.Linear(24, 10)
    fl = fusedformer.nn.Linear(24, 10)
    fl.load_state_dict(tl.state_dict(), strict=True)
    assert set(fl.state_dict()) == {"weight", "bias"}
    for rows in (1, 3, 40):
        x = make((rows, 24), seed=rows, requires_grad=True)
        torch.testing.assert_close(fl(x), tl(x), rtol=1e-5, atol=1e-5)
    x = make((2, 24), requires_grad=True, seed=9)
    fl(x).sum().backward()
    gw = fl.weight.grad.clone()
    tl(x).sum().backward()
    torch.testing.assert_close(gw, tl.weight.grad)
    nb = fusedformer.nn.Linear(24, 10, bias=False)
    assert nb.bias is None and nb(make((1, 24))).shape == (1, 10)


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    x, w = make((2, 8), device=device), make((3, 8), device=device)
    with pytest.raises(ValueError, match="in_features"):
        _ops.linear(make((2, 7), device=device), w, None)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        _ops.linear(x, make((3, 8, 1), device=device), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        _ops.linear(x, w, make((4,), device=device))
    with pytest.raises(TypeError, match="weight must have the dtype of input"):
        _ops.linear(x, w.double(), None)
    with pytest.raises(TypeError, match="bias must have the dtype of input"):
        _ops.linear(x, w, make((3,), device=device).half())
    with pytest.raises(TypeError, match="input must be float32"):
        _ops.linear(x.long(), w.long(), None)
    with pytest.raises(ValueError, match="at least one dimension"):
        _ops.linear(torch.tensor(1.0, device=device), w, None)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        fusedformer.linear([1.0], w)
    with pytest.raises(RuntimeError, match="weight must be on the device of input"):
        _ops.linear(x, w.to("meta"), None)

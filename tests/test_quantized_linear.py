"""fusedformer.ops.quantized_linear and the fusedformer::quantized_linear kernels: values against the
float64 dequantize-then-matmul reference for every dtype, scheme, group size, row count (the streamed
few-rows path and the panel path), odd shapes, strided inputs and every instruction set; the packing
helpers, nf4's level table and the int4 / nf4 scale searches; input gradients and the refused weight gradient; opcheck,
torch.compile and the errors."""

import pytest
import torch
import torch.nn.functional as F

import fusedformer
from fusedformer import reference
from fusedformer.ops.quantized_linear import (GROUPED_SCHEMES, NF4_LEVELS, SCHEMES, dequantize_weight, pack_int4,
                                              quantize_weight, unpack_int4)
from _util import DTYPES, ISAS, LOWP, assert_matches_reference, cpu_isa, make, skip_unless_cuda

_ops = torch.ops.fusedformer

ROWS = [1, 3, 16, 17, 200]  # up to 16: the weight stream; above: dequantized panels (int8 / int4)
SHAPES = [(1, 64), (17, 96), (300, 1024)]  # (N, K)


def _weights(N, K, scheme, group_size, seed):
    w = make((N, K), seed=seed, scale=K ** -0.5)
    return quantize_weight(w, scheme, group_size)


def _check(M, N, K, dtype, scheme, group_size=None, *, bias=True, noncontig=False, lead=(), seed=0,
           device="cpu"):
    q, s = _weights(N, K, scheme, group_size, seed)
    x = make((*lead, M, K), dtype, seed=seed + 1, noncontig=noncontig)
    b = make((N,), dtype, seed=seed + 2) if bias else None
    on = (lambda t: t.to(device) if t is not None else None)
    got = fusedformer.ops.quantized_linear(on(x), on(q), on(s), on(b), scheme)
    assert got.device.type == device
    got = got.cpu()
    ref = reference.quantized_linear(x, q, s, b, scheme)
    what = f"quantized_linear {scheme} g={group_size} {dtype} M={M} N={N} K={K}"
    assert got.dtype == dtype and got.shape == (*lead, M, N) and got.is_contiguous(), what
    if dtype == torch.float64:
        # weight-only: exact products in double; dynamic: the int32 sums scaled in float32
        tol = 1e-6 if scheme.endswith("_dynamic") else 1e-12
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
        return
    if scheme == "int8_dynamic":
        # the same integers as the reference: only the final scaling and the output rounding differ
        eps = 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(got.double(), ref, rtol=eps, atol=eps * ref.abs().max().item(),
                                   msg=lambda m: f"{what}: {m}")
        return
    w = dequantize_weight(q, s, scheme, torch.float64)
    # int4_dynamic: float sums of the block products (few rows) or of the dequantized x and W (many)
    xp = reference.dynamic_input(x, scheme).to(dtype) if scheme == "int4_dynamic" else x
    peer = F.linear(xp, w.to(dtype), b) if dtype in LOWP else None
    assert_matches_reference(got, ref, peer, rtol=2e-5, atol=2e-5, what=what)


@pytest.mark.parametrize("isa", ISAS)
def test_int8_dynamic_many_rows_odd_shapes(isa):
    """Many rows of int8_dynamic (with AVX512-VNNI: W packed in 64-channel blocks of 4-byte groups):
    input features not a multiple of 4 and channels not a multiple of 16 or 64 are zero padded."""
    with cpu_isa(isa):
        for M, N, K in ((17, 1, 5), (40, 70, 37), (101, 129, 258), (23, 64, 4)):
            for dtype in (torch.float32, torch.bfloat16):
                _check(M, N, K, dtype, "int8_dynamic", bias=N % 2 == 1, seed=M + N + K)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_against_reference(isa, dtype, scheme):
    with cpu_isa(isa):
        for M in ROWS:
            for N, K in SHAPES if M < 200 else SHAPES[:2]:
                _check(M, N, K, dtype, scheme, 32 if scheme in GROUPED_SCHEMES else None, bias=(M + N) % 2 == 0,
                       seed=M * 1000 + N)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", GROUPED_SCHEMES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_4bit_group_sizes(isa, scheme, group_size):
    with cpu_isa(isa):
        for M in (1, 5, 40):
            for dtype in (torch.float32, torch.bfloat16):
                _check(M, 45, 1024, dtype, scheme, group_size, seed=group_size + M)
                _check(M, 7, 4 * group_size, dtype, scheme, group_size, bias=False, seed=group_size + M + 1)


@pytest.mark.parametrize("isa", ISAS)
def test_nf4_levels_are_the_kernels(isa):
    """Every kernel path reads code c as NF4_LEVELS[c] (the table in Python and the kernels' copy agree
    exactly): W's row c holds code c everywhere, scale 2, so x = e_k gives 2 x the levels."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    codes = torch.arange(16, dtype=torch.uint8)
    q = (codes | (codes << 4))[:, None].expand(16, 32).contiguous()  # (16, 64 / 2): both nibbles c
    s = torch.full((16, 2), 2.0)
    with cpu_isa(isa):
        for M in (1, 5, 40):  # the stream, its tile of several rows, the dequantized panels
            for dtype in (torch.float32, torch.float64):
                x = torch.zeros(M, 64, dtype=dtype)
                x[torch.arange(M), torch.arange(M) % 64] = 1
                y = fusedformer.ops.quantized_linear(x, q, s, None, "nf4")
                assert torch.equal(y, (2 * levels).to(dtype).expand(M, 16)), (M, dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_strided_and_batched_input(scheme):
    g = 32 if scheme in GROUPED_SCHEMES else None
    for M in (3, 17, 40):
        _check(M, 33, 128, torch.float32, scheme, g, noncontig=True, seed=M)
        _check(M, 33, 128, torch.bfloat16, scheme, g, noncontig=True, lead=(2,), seed=M + 1)
    # a transposed view: rows far apart
    q, s = _weights(9, 64, scheme, g, 3)
    x = make((64, 20), seed=4).t()
    torch.testing.assert_close(fusedformer.ops.quantized_linear(x, q, s, None, scheme).double(),
                               reference.quantized_linear(x, q, s, None, scheme), rtol=1e-5, atol=1e-5)


def test_zero_rows_and_zero_weights():
    q, s = _weights(5, 64, "int8", None, 0)
    assert fusedformer.ops.quantized_linear(torch.empty(0, 64), q, s, None, "int8").shape == (0, 5)
    # an all-zero input row and an all-zero weight row (scale 0) give the bias, never NaN
    qz, sz = quantize_weight(torch.zeros(3, 64), "int4", 32)
    for scheme, (qq, ss) in (("int4", (qz, sz)), ("nf4", quantize_weight(torch.zeros(3, 64), "nf4", 32)),
                             ("int8_dynamic", quantize_weight(torch.zeros(3, 64), "int8"))):
        b = torch.arange(3, dtype=torch.float32)
        y = fusedformer.ops.quantized_linear(torch.zeros(2, 64), qq, ss, b, scheme)
        assert torch.equal(y, b.expand(2, 3))


def test_packing_round_trip_and_quantization_error():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 128), generator=g)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64)
    assert torch.equal(unpack_int4(packed), q.to(torch.int8))
    # documented layout: byte j of a block holds elements j (low nibble) and j + 16 (high), as q + 8
    assert packed[0, 3].item() == (q[0, 3].item() + 8) | ((q[0, 19].item() + 8) << 4)
    w = make((7, 256), seed=1)
    qw, sc = quantize_weight(w, "int8")
    err = (dequantize_weight(qw, sc, "int8") - w).abs()
    assert (err <= 0.5 * sc[:, None] + 1e-7).all() and err.max() <= w.abs().max() / 127  # half a step


def _group_errors(w, q, s, group, scheme="int4"):
    return ((dequantize_weight(q, s, scheme) - w) ** 2).reshape(w.shape[0], -1, group).sum(2)


@pytest.mark.parametrize("group", [32, 128])
def test_int4_scale_search(group):
    """Each group's scale is the searched one of least squared error: no group worse than plain
    rounding with its largest magnitude at -8, the total about 12% below it on normal weights and
    within 1% of a brute-force search over 600 scales (each refitted to its rounding); zero and
    negligible groups quantize to zero."""
    w = make((16, 512), seed=3)
    q, s = quantize_weight(w, "int4", group)
    assert q.shape == (16, 256) and s.shape == (16, 512 // group) and s.dtype == torch.float32
    err = _group_errors(w, q, s, group)
    g = w.reshape(16, -1, group)
    m = torch.gather(g, 2, g.abs().argmax(dim=2, keepdim=True))
    plain = ((torch.round(g / (m / -8)).clamp(-8, 7) * (m / -8) - g) ** 2).sum(2)
    assert (err <= plain * (1 + 1e-5)).all()
    assert err.sum() <= 0.9 * plain.sum(), (err.sum(), plain.sum())
    brute = None
    for c in torch.arange(4.0, 16.0, 0.02).tolist():
        r = torch.round(g / (m / -c)).clamp(-8, 7)
        fitted = (r * g).sum(2, keepdim=True) / (r * r).sum(2, keepdim=True)
        r = torch.round(g / fitted).clamp(-8, 7)
        e = ((r * fitted - g) ** 2).sum(2)
        brute = e if brute is None else torch.minimum(brute, e)
    assert err.sum() <= 1.01 * brute.sum(), (err.sum(), brute.sum())
    # most values within half a step of the grid (a few extremes may be clipped for a finer step)
    step = s.abs().repeat_interleave(group, dim=1)
    assert ((dequantize_weight(q, s, "int4") - w).abs() <= 0.5 * step + 1e-7).float().mean() > 0.95
    # a zero group and one of subnormal values: q = 0 (stored 8), scale 0, no NaN
    w[0, :group] = 0
    w[1, :group] = 1e-40
    q, s = quantize_weight(w, "int4", group)
    assert (q[:2, :group // 2] == 0x88).all() and (s[:2, 0] == 0).all() and torch.isfinite(s).all()
    assert (_group_errors(w, q, s, group)[2:] == err[2:]).all()


@pytest.mark.parametrize("group", [32, 128])
def test_nf4_scale_search(group):
    """nf4: each weight at the nearest level of its group's searched scale; the total squared error
    within 1% of a brute-force search over 300 scales (each refitted to its rounding) and below
    int4's on normal weights (the levels are denser near zero); zero groups give code 7 (level 0)."""
    w = make((16, 512), seed=3)
    q, s = quantize_weight(w, "nf4", group)
    assert q.shape == (16, 256) and s.shape == (16, 512 // group) and (s > 0).all()
    err = _group_errors(w, q, s, group, "nf4")
    levels = torch.tensor(NF4_LEVELS)
    deq = dequantize_weight(q, s, "nf4")
    # nearest level: no other level of the group's grid is closer
    grid = levels[None, :] * s.repeat_interleave(group, dim=1).reshape(-1, 1)
    assert ((grid - w.reshape(-1, 1)).abs().min(1).values >= (deq - w).reshape(-1).abs() - 1e-7).all()
    g = w.reshape(16, -1, group)
    m = g.abs().amax(dim=2, keepdim=True)
    brute = None
    for c in torch.arange(0.5, 1.5, 1 / 300).tolist():
        v = levels[torch.argmin((g[..., None] / (m[..., None] * c) - levels).abs(), dim=-1)]
        fitted = (v * g).sum(2, keepdim=True) / (v * v).sum(2, keepdim=True)
        v = levels[torch.argmin((g[..., None] / fitted[..., None] - levels).abs(), dim=-1)]
        e = ((v * fitted - g) ** 2).sum(2)
        brute = e if brute is None else torch.minimum(brute, e)
    assert err.sum() <= 1.01 * brute.sum(), (err.sum(), brute.sum())
    q4, s4 = quantize_weight(w, "int4", group)
    assert err.sum() < 0.97 * _group_errors(w, q4, s4, group).sum()
    w[0, :group] = 0
    q, s = quantize_weight(w, "nf4", group)
    assert (q[0, :group // 2] == 0x77).all() and s[0, 0] == 0
    assert torch.equal(dequantize_weight(q, s, "nf4")[0, :group], torch.zeros(group))


@skip_unless_cuda()
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda(dtype, scheme):
    """The CUDA kernels: the weight stream (up to 16 rows) and the dequantize-then-cuBLAS path."""
    for M in ROWS:
        for N, K in SHAPES:
            _check(M, N, K, dtype, scheme, 32 if scheme in GROUPED_SCHEMES else None, seed=M + N, device="cuda")
    _check(5, 64, 256, dtype, scheme, 128 if scheme in GROUPED_SCHEMES else None, noncontig=True, lead=(2,),
           device="cuda")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_input_gradient(scheme):
    g = 32 if scheme in GROUPED_SCHEMES else None
    q, s = _weights(6, 64, scheme, g, 1)
    x = make((2, 3, 64), torch.float64, seed=2, requires_grad=True)
    b = make((6,), torch.float64, seed=3, requires_grad=True)
    y = fusedformer.ops.quantized_linear(x, q, s, b, scheme)
    gy = make(y.shape, torch.float64, seed=4)
    gx, gb = torch.autograd.grad(y, (x, b), gy)
    w = dequantize_weight(q, s, scheme, torch.float64)
    torch.testing.assert_close(gx, gy @ w)
    torch.testing.assert_close(gb, gy.sum((0, 1)))


def test_weight_gradient_is_refused():
    q, s = _weights(6, 64, "int8", None, 1)
    s = s.clone().requires_grad_()
    y = fusedformer.ops.quantized_linear(make((2, 64), seed=2), q, s, None, "int8")
    with pytest.raises(RuntimeError, match="no gradient flows to scale"):
        y.sum().backward()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_opcheck(scheme):
    g = 32 if scheme in GROUPED_SCHEMES else None
    q, s = _weights(6, 64, scheme, g, 1)
    x, b = make((4, 64), seed=2), make((6,), seed=3)
    torch.library.opcheck(_ops.quantized_linear.default, (x, q, s, b, scheme))
    torch.library.opcheck(_ops.quantized_linear.default, (x.requires_grad_(), q, s, None, scheme))


def test_compile_fullgraph():
    q, s = _weights(6, 64, "int4", 32, 1)
    x, b = make((3, 64), seed=2), make((6,), seed=3)
    got = torch.compile(lambda a: fusedformer.ops.quantized_linear(a, q, s, b, "int4").relu(), fullgraph=True)(x)
    torch.testing.assert_close(got, fusedformer.ops.quantized_linear(x, q, s, b, "int4").relu())


def test_errors_name_the_argument():
    op = fusedformer.ops.quantized_linear
    q8, s8 = _weights(6, 64, "int8", None, 1)
    q4, s4 = _weights(6, 64, "int4", 32, 1)
    x = make((2, 64), seed=2)
    cases = [
        (lambda: op(x, q8, s8, None, "nf4"), "qweight must be uint8 .* for scheme \"nf4\""),
        (lambda: op(x, q8, s8, None, "int3"), "scheme"),
        (lambda: op(x.int(), q8, s8, None, "int8"), "input"),
        (lambda: op(x, q8.to(torch.uint8), s8, None, "int8"), "qweight must be int8"),
        (lambda: op(x, q8, s8, None, "int4"), "qweight must be uint8"),
        (lambda: op(make((2, 63), seed=2), q8, s8, None, "int8"), "in_features"),
        (lambda: op(make((2, 62), seed=2), q4, s4, None, "int4"), "half the last dim"),
        (lambda: op(x, q8, s8.double(), None, "int8"), "scale must be float32"),
        (lambda: op(x, q8, s8[:5], None, "int8"), "scale must have shape"),
        (lambda: op(x, q4, s4.reshape(-1)[:6], None, "int4"), "scale must have shape"),
        (lambda: op(x, q4, torch.ones(6, 4), None, "int4"), "multiple of 32"),
        (lambda: op(x, q8, s8, make((5,), seed=3), "int8"), "bias"),
        (lambda: op(x, q8, s8, make((6,), torch.bfloat16, seed=3), "int8"), "bias"),
        (lambda: op(x, q8, s8.reshape(6, 1, 1)[:, 0, 0].expand(6), None, "int8"), None),  # a view is fine
    ]
    for fn, match in cases:
        if match is None:
            assert fn().shape == (2, 6)
            continue
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            fn()
    with pytest.raises(TypeError, match="qweight must be a torch.Tensor"):
        op(x, None, s8)

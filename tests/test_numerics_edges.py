"""Numerical edge cases and their documented behaviour (docs/reliability.md, "Numerics at the edges"):
huge logits in float16/bfloat16, fully masked rows, rows of length 1 and 1,000,000, NaN inputs,
values near the dtype's maximum."""

import math

import pytest
import torch

import fusedformer
from fusedformer import ops
from fusedformer import reference as ref
from _util import assert_matches_reference

LOWP = [torch.float16, torch.bfloat16]


def _peer_softmax(x, mask=None):
    z = x if mask is None else x.masked_fill(~mask, float("-inf"))
    return torch.softmax(z, dim=-1)


# ---------------------------------------------------------------------------------------------
# logits of +-1e4 in float16 / bfloat16


@pytest.mark.parametrize("dtype", LOWP)
def test_softmax_logits_1e4(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 300, generator=g) * 1e4).clamp(-1e4, 1e4).to(dtype)
    x[:, 7] = 1e4
    x[:, 9] = -1e4
    x[3] = 1e4  # a row of equal maxima: uniform
    x.requires_grad_(True)
    y = ops.softmax(x)
    assert torch.isfinite(y).all()
    assert_matches_reference(y, ref.softmax(x), _peer_softmax(x.detach()), what="softmax 1e4")
    torch.testing.assert_close(y[3].float(), torch.full((300,), 1 / 300), rtol=1e-2, atol=0)
    (gx,) = torch.autograd.grad((y.float() * torch.arange(300.0)).sum(), x)
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("dtype", LOWP)
def test_attention_logits_1e4(dtype):
    """q.k of order 1e4 after scaling: the online softmax never overflows."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 2, 9, 16, generator=g) * 25).to(dtype).requires_grad_(True)
    k = (torch.randn(1, 2, 40, 16, generator=g) * 25).to(dtype).requires_grad_(True)
    v = torch.randn(1, 2, 40, 16, generator=g).to(dtype).requires_grad_(True)
    out = ops.attention(q, k, v, scale=1.0)
    peer = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), scale=1.0)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, ref.attention(q, k, v, scale=1.0), peer, what="attention 1e4")
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in grads)


# ---------------------------------------------------------------------------------------------
# fully masked rows: zeros, and zero gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bool", "neginf"])
def test_softmax_fully_masked_rows(dtype, kind):
    x = torch.randn(4, 6, 10).to(dtype).requires_grad_(True)
    keep = torch.rand(6, 10) > 0.3
    keep[2] = False
    mask = keep if kind == "bool" else torch.zeros(6, 10).masked_fill(~keep, float("-inf"))
    y = ops.softmax(x, mask=mask)
    assert torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))
    assert not torch.isnan(y).any()
    (gx,) = torch.autograd.grad((y.float() * torch.randn(y.shape)).sum(), x)
    assert torch.equal(gx[:, 2], torch.zeros_like(gx[:, 2])) and not torch.isnan(gx).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_fully_masked_rows(dtype):
    q = torch.randn(2, 3, 7, 16).to(dtype).requires_grad_(True)
    k = torch.randn(2, 3, 9, 16).to(dtype).requires_grad_(True)
    v = torch.randn(2, 3, 9, 16).to(dtype).requires_grad_(True)
    keep = torch.rand(7, 9) > 0.3
    keep[4] = False
    keep[:, 0] = keep[:, 0] & (torch.arange(7) != 4)
    for mask in (keep, torch.zeros(7, 9).masked_fill(~keep, float("-inf"))):
        out = ops.attention(q, k, v, attn_mask=mask)
        assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4])) and not torch.isnan(out).any()
        gq, gk, gv = torch.autograd.grad((out.float() * torch.randn(out.shape)).sum(), (q, k, v))
        assert torch.equal(gq[:, :, 4], torch.zeros_like(gq[:, :, 4]))
        assert not any(torch.isnan(t).any() for t in (gq, gk, gv))
    # causal plus a mask that removes key 0: query 0 has no key left
    out = ops.attention(q, k, v, attn_mask=torch.arange(9) != 0, is_causal=True)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0])) and not torch.isnan(out).any()


# ---------------------------------------------------------------------------------------------
# rows of length 1 and 1,000,000


def test_length_one_rows():
    x = torch.randn(5, 1, requires_grad=True)
    y = ops.softmax(x)
    assert torch.equal(y, torch.ones(5, 1))
    (gx,) = torch.autograd.grad((y * torch.randn(5, 1)).sum(), x)
    assert torch.equal(gx, torch.zeros(5, 1))
    assert torch.equal(ops.softmax(x, mask=torch.tensor([[False]])), torch.zeros(5, 1))
    b = torch.randn(1)
    # layer norm of one element: x - mean = 0, so the output is the bias
    assert torch.equal(ops.layer_norm(x, 1, torch.randn(1), b), b.expand(5, 1))
    # RMS norm of one element: x / sqrt(x^2 + eps)
    xd = x.detach().double()
    torch.testing.assert_close(ops.rms_norm(x, 1, eps=1e-6).double(), xd / (xd.square() + 1e-6).sqrt(), rtol=1e-6, atol=0)
    # attention over one key: the output is that key's value, for every query
    q, k, v = torch.randn(2, 6, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 5)
    assert torch.allclose(ops.attention(q, k, v), v.expand(2, 6, 5), rtol=0, atol=1e-6)
    # one query, one key, causal
    assert torch.allclose(ops.attention(q[:, :1], k, v, is_causal=True), v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_row_of_a_million(dtype):
    n = 1_000_000
    x = (torch.randn(2, n) * 3).to(dtype).requires_grad_(True)
    y = ops.softmax(x)
    r = ref.softmax(x)
    peer = torch.softmax(x.detach(), -1)
    if dtype == torch.float32:
        # relative error of each probability: the float32 sum of 1e6 terms costs ~2e-4, for
        # torch.softmax as for us; the rule is ours <= 2 x torch's
        ours_rel = ((y.double() - r).abs() / r).max().item()
        peer_rel = ((peer.double() - r).abs() / r).max().item()
        assert ours_rel <= 2 * peer_rel + 1e-6, (ours_rel, peer_rel)
    else:
        assert_matches_reference(y, r, peer, what="softmax 1e6")
    # the rows sum to 1 up to the float32 rounding of a 1e6-term sum, no worse than torch.softmax's
    ours_sum_err = (y.double().sum(-1) - 1).abs().max().item()
    peer_sum_err = (peer.double().sum(-1) - 1).abs().max().item()
    assert ours_sum_err <= 2 * peer_sum_err + 1e-5, (ours_sum_err, peer_sum_err)
    w = torch.randn(2, n)
    (gx,) = torch.autograd.grad((y.float() * w).sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad((torch.softmax(x64, -1) * w.double()).sum(), x64)
    if dtype == torch.float32:
        torch.testing.assert_close(gx.double(), g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())
    else:
        assert (gx.double() - g64).abs().max() <= 2e-2 * g64.abs().max()


@pytest.mark.parametrize("rms", [False, True])
def test_norm_row_of_a_million(rms):
    n = 1_000_000
    x = (torch.randn(2, n) * 2 + 5).requires_grad_(True)
    w = torch.randn(n, requires_grad=True)
    norm = ops.rms_norm if rms else ops.layer_norm
    y = norm(x, n, w, eps=1e-5)
    r = (ref.rms_norm if rms else ref.layer_norm)(x, n, w, eps=1e-5)
    assert_matches_reference(y, r, rtol=1e-5, atol=1e-4, what="norm 1e6")
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = (ref.rms_norm if rms else ref.layer_norm)
    if rms:
        o64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * w64
    else:
        o64 = torch.nn.functional.layer_norm(x64, (n,), w64, None, 1e-5)
    g64x, g64w = torch.autograd.grad(o64.sum(), (x64, w64))
    assert y64 is not None
    torch.testing.assert_close(gx.double(), g64x, rtol=1e-3, atol=1e-3 * g64x.abs().max().item())
    torch.testing.assert_close(gw.double(), g64w, rtol=1e-4, atol=1e-4)


def test_attention_million_keys():
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    k = torch.randn(1, 2, 1_000_000, 8, requires_grad=True)
    v = torch.randn(1, 2, 1_000_000, 4, requires_grad=True)
    out = ops.attention(q, k, v, scale=2.0)
    assert_matches_reference(out, ref.attention(q, k, v, scale=2.0), rtol=1e-4, atol=1e-5, what="attention 1e6")
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (gq, gk, gv))
    # the value gradient is the attention probabilities summed over queries: total mass = L per head
    torch.testing.assert_close(gv.double().sum(dim=(2,)), torch.full((1, 2, 4), 2.0, dtype=torch.float64), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------
# NaN input: propagates as NaN to what it touches, never crashes, never leaks into other rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nan_propagates_softmax(dtype):
    x = torch.randn(4, 37).to(dtype)
    x[1, 5] = float("nan")
    y = ops.softmax(x)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2, 3]]).all()
    assert torch.equal(y[[0, 2, 3]], ops.softmax(x[[0, 2, 3]]))
    # an additive mask does not hide it (NaN + m is NaN) ...
    assert torch.isnan(ops.softmax(x, mask=torch.zeros(37).to(dtype))[1]).all()
    # ... a bool-masked or causally masked position takes no part in the row, NaN or not, as in
    # the reference (masked_fill replaces it by -inf)
    mask = torch.ones(37, dtype=torch.bool)
    mask[5] = False
    y = ops.softmax(x, mask=mask)
    assert torch.isfinite(y).all() and torch.equal(y[1, 5], torch.zeros((), dtype=dtype))
    xc = torch.randn(37, 37).to(dtype)
    xc[3, 20] = float("nan")
    yc = ops.softmax(xc, is_causal=True)
    assert torch.isfinite(yc).all()
    xc[30, 20] = float("nan")
    yc = ops.softmax(xc, is_causal=True)
    # the row's keys are NaN; its causally excluded keys (j > i) are never read and stay 0
    assert torch.isnan(yc[30, :31]).all() and torch.equal(yc[30, 31:], torch.zeros(6, dtype=dtype))
    assert torch.isfinite(yc[:30]).all() and torch.isfinite(yc[31:]).all()


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_propagates_norms(rms, dtype):
    x = torch.randn(4, 96).to(dtype)
    x[2, 50] = float("nan")
    norm = ops.rms_norm if rms else ops.layer_norm
    y = norm(x, 96)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()
    # the residual form: NaN in the residual poisons its row of both outputs
    r = torch.randn(4, 96).to(dtype)
    r[0, 1] = float("nan")
    out, h = norm(torch.randn(4, 96).to(dtype), 96, residual=r)
    assert torch.isnan(out[0]).all() and torch.isnan(h[0, 1]) and torch.isfinite(out[1:]).all()


def test_nan_propagates_attention():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    q[0, 1, 3, 2] = float("nan")
    out = ops.attention(q, k, v)
    assert torch.isnan(out[0, 1, 3]).all()
    finite = torch.ones(1, 2, 5, dtype=torch.bool)
    finite[0, 1, 3] = False
    assert torch.isfinite(out[finite]).all()
    # a NaN key reaches every query that may attend to it, and only those (causal: queries >= 4)
    q[0, 1, 3, 2] = 0.0
    k[0, 0, 4, 0] = float("nan")
    out = ops.attention(q, k, v, is_causal=True)
    assert torch.isnan(out[0, 0, 4:]).all()
    assert torch.isfinite(out[0, 0, :4]).all() and torch.isfinite(out[0, 1]).all()


# ---------------------------------------------------------------------------------------------
# values near the dtype's maximum


def test_float16_near_max():
    big = torch.finfo(torch.float16).max  # 65504
    x = (torch.rand(6, 64) * 2 - 1).mul(big).half()
    x[0] = big
    x[1, :32] = -big
    # softmax: z - max never overflows
    y = ops.softmax(x)
    assert torch.isfinite(y).all()
    assert_matches_reference(y, ref.softmax(x), _peer_softmax(x), what="softmax fp16 max")
    # norms: statistics are float32, where 65504^2 * 64 is far from overflow
    for norm, reference in ((ops.layer_norm, ref.layer_norm), (ops.rms_norm, ref.rms_norm)):
        out = norm(x, 64)
        assert torch.isfinite(out).all()
        peer = (torch.nn.functional.layer_norm if norm is ops.layer_norm else torch.nn.functional.rms_norm)(
            x.float(), (64,)).half()
        assert_matches_reference(out, reference(x, 64), peer, what=norm.__name__)
    # the residual sum overflows to inf in float16 exactly as input + residual does
    out, h = ops.layer_norm(x, 64, residual=x)
    assert torch.equal(h, x + x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_near_max_float32_range(dtype):
    """Values whose squares overflow float32 (|x| > ~1.8e19): softmax is exact (it only subtracts
    and exponentiates); the norms' float32 statistics overflow, rstd is 0 and the output is the
    bias (zeros without one), not NaN (torch's float32 layer_norm gives NaN, its rms_norm 0). A
    layer_norm row whose differences from its first element overflow too (a value at the dtype's
    maximum beside values of the other sign) gives NaN, as torch's does."""
    x = torch.randn(3, 16).to(dtype) * 1e30
    x[0, 0] = torch.finfo(dtype).max
    y = ops.softmax(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref.softmax(x), rtol=0, atol=1e-2 if dtype != torch.float32 else 1e-6)
    w, b = torch.randn(16).to(dtype), torch.randn(16).to(dtype)
    assert torch.isnan(ops.layer_norm(x, 16, w, b)[0]).all()
    assert torch.equal(ops.layer_norm(x, 16, w, b)[1:], b.expand(2, 16))
    assert torch.equal(ops.layer_norm(x, 16)[1:].abs(), torch.zeros(2, 16, dtype=dtype))
    assert torch.equal(ops.rms_norm(x, 16, w).abs(), torch.zeros(3, 16, dtype=dtype))
    # rows in range next to them are unaffected
    x[1] = torch.randn(16).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, 16)[1].double(), ref.rms_norm(x, 16)[1], rtol=1e-2, atol=1e-2)

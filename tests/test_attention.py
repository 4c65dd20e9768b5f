"""fusedformer.ops.attention (attention_fwd / attention_bwd) against the float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedformer
from fusedformer import ops
from fusedformer import reference as ref
from _util import DEVICES, ISAS, LOWP, assert_matches_reference, cpu_isa, make, skip_unless_cuda

_ops = torch.ops.fusedformer


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _check(q, k, v, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=None, device="cpu", grad=True,
           rtol=1e-5, atol=1e-5):
    """ops.attention on `device` against the float64 reference: output and, with grad, dQ, dK, dV."""
    if enable_gqa is None:
        enable_gqa = q.dim() >= 3 and q.size(-3) != k.size(-3)
    qd, kd, vd = (_leaf(t.to(device)) for t in (q, k, v))
    m = attn_mask.to(device) if attn_mask is not None else None
    out = ops.attention(qd, kd, vd, attn_mask=m, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    q64, k64, v64 = (_leaf(t.double()) for t in (q, k, v))
    want = ref.attention(q64, k64, v64, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    assert_matches_reference(out, want, rtol=rtol, atol=atol, what="out")
    if not grad:
        return out
    g = make(tuple(out.shape), seed=7)
    got = torch.autograd.grad(out, (qd, kd, vd), g.to(device, out.dtype))
    exp = torch.autograd.grad(want, (q64, k64, v64), g.double())
    for name, a, b in zip("qkv", got, exp):
        assert_matches_reference(a, b, rtol=rtol, atol=atol, what=f"grad {name}")
    return out


# ---------------------------------------------------------------------------------------------
# Shapes

# (B, Hq, Hkv, L, S, E, Ev)
SHAPES = [
    (2, 2, 2, 37, 129, 40, 40),   # L != S, odd lengths, several key blocks
    (1, 2, 2, 129, 37, 80, 80),   # L > S
    (1, 3, 3, 1, 70, 96, 96),     # one query (decode path)
    (1, 2, 2, 17, 1, 1, 1),       # one key, head dim 1
    (1, 1, 1, 65, 65, 128, 128),
    (1, 1, 1, 33, 50, 256, 256),  # largest head dim
    (2, 2, 2, 20, 30, 24, 56),    # value head dim differs
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_values_and_grads(device, isa, shape, is_causal):
    B, Hq, Hkv, L, S, E, Ev = shape
    q, k, v = make((B, Hq, L, E), seed=1), make((B, Hkv, S, E), seed=2), make((B, Hkv, S, Ev), seed=3)
    with cpu_isa(isa):
        _check(q, k, v, is_causal=is_causal, device=device)


@pytest.mark.parametrize("isa", ISAS)
def test_non_contiguous_and_transposed(isa):
    # (B, L, H, E) buffers viewed as (B, H, L, E), and inputs with a feature stride of 2
    B, H, L, S, E = 2, 3, 21, 45, 40
    q = make((B, L, H, E), seed=1).transpose(1, 2)
    k = make((B, S, H, E), seed=2).transpose(1, 2)
    v = make((B, H, S, E), seed=3, noncontig=True)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    with cpu_isa(isa):
        _check(q, k, v)
        _check(q, k, v, is_causal=True)
        # decode path with strided keys (a view of a larger KV cache)
        cache = make((B, H, 2 * S, E), seed=4)
        _check(q[:, :, :1], cache[:, :, :S], cache[:, :, S:])


@pytest.mark.parametrize("shape", [(13, 40), (3, 2, 9, 24), (2, 2, 3, 5, 16)], ids=["rank2", "rank4", "rank5"])
def test_ranks(shape):
    kshape = shape[:-2] + (11, shape[-1])
    _check(make(shape, seed=1), make(kshape, seed=2), make(kshape, seed=3), is_causal=True)


def test_scale():
    q, k, v = make((1, 2, 9, 16), seed=1), make((1, 2, 12, 16), seed=2), make((1, 2, 12, 16), seed=3)
    _check(q, k, v, scale=0.37)
    _check(q, k, v, scale=2.0, is_causal=True)


# ---------------------------------------------------------------------------------------------
# Masks


def _masks(B, H, L, S):
    g = torch.Generator().manual_seed(5)
    neg = torch.randn(L, S, generator=g, dtype=torch.float64)
    neg[torch.rand(L, S, generator=g) < 0.3] = float("-inf")
    return {
        "bool_full": torch.rand(B, H, L, S, generator=g) > 0.3,
        "bool_1_1_L_S": torch.rand(1, 1, L, S, generator=g) > 0.5,
        "bool_B_1_1_S": torch.rand(B, 1, 1, S, generator=g) > 0.4,
        "bool_L_S": torch.rand(L, S, generator=g) > 0.3,
        "additive_full": torch.randn(B, H, L, S, generator=g, dtype=torch.float64).float(),
        "additive_B_1_1_S": torch.randn(B, 1, 1, S, generator=g, dtype=torch.float64).float(),
        "additive_L_S_with_inf": neg.float(),
    }


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("L", [1, 3, 29])
@pytest.mark.parametrize("kind", list(_masks(2, 3, 4, 4)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_masks(isa, L, kind, is_causal):
    B, H, S, E = 2, 3, 70, 24
    mask = _masks(B, H, L, S)[kind]
    q, k, v = make((B, H, L, E), seed=1), make((B, H, S, E), seed=2), make((B, H, S, E), seed=3)
    with cpu_isa(isa):
        _check(q, k, v, attn_mask=mask, is_causal=is_causal)


def test_float64_mask_with_float32_inputs():
    q, k, v = make((1, 2, 7, 16), seed=1), make((1, 2, 9, 16), seed=2), make((1, 2, 9, 16), seed=3)
    _check(q, k, v, attn_mask=torch.randn(7, 9, dtype=torch.float64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("L,S", [(5, 40), (40, 5), (70, 130), (130, 70)])
def test_causal_with_l_not_s(isa, L, S):
    # top-left alignment (PyTorch's): query i keeps keys j <= i
    q, k, v = make((1, 2, L, 32), seed=1), make((1, 2, S, 32), seed=2), make((1, 2, S, 32), seed=3)
    with cpu_isa(isa):
        out = _check(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("L", [1, 2, 37])
def test_fully_masked_rows_give_zeros(isa, L):
    B, H, S, E = 1, 2, 80, 16
    q, k, v = make((B, H, L, E), seed=1), make((B, H, S, E), seed=2), make((B, H, S, E), seed=3)
    mask = torch.rand(B, H, L, S) > 0.5
    mask[:, :, 0] = False  # query 0 of every head sees no key
    additive = torch.zeros(L, S)
    additive[L // 2] = float("-inf")
    with cpu_isa(isa):
        for m, row in ((mask, 0), (additive, L // 2), (torch.zeros(1, 1, 1, S, dtype=torch.bool), slice(None))):
            qd, kd, vd = (_leaf(t) for t in (q, k, v))
            out = ops.attention(qd, kd, vd, attn_mask=m)
            dq, dk, dv = torch.autograd.grad(out, (qd, kd, vd), torch.ones_like(out))
            assert torch.isfinite(out).all() and torch.isfinite(dq).all()
            assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
            assert (out[:, :, row] == 0).all()
            assert (dq[:, :, row] == 0).all()
            _check(q, k, v, attn_mask=m)
        # every key masked: zeros everywhere, gradients included
        qd, kd, vd = (_leaf(t) for t in (q, k, v))
        out = ops.attention(qd, kd, vd, attn_mask=torch.zeros(L, S, dtype=torch.bool))
        grads = torch.autograd.grad(out, (qd, kd, vd), torch.ones_like(out))
        assert (out == 0).all() and all((t == 0).all() for t in grads)


# ---------------------------------------------------------------------------------------------
# Grouped-query and multi-query attention (tiled and decode paths)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1), (8, 1)], ids=["gqa", "mqa6", "mqa8"])
@pytest.mark.parametrize("L", [1, 2, 33])
def test_gqa_mqa(isa, Hq, Hkv, L):
    B, S, E = 2, 75, 40
    q, k, v = make((B, Hq, L, E), seed=1), make((B, Hkv, S, E), seed=2), make((B, Hkv, S, E), seed=3)
    mask = torch.rand(B, 1, L, S) > 0.2
    with cpu_isa(isa):
        _check(q, k, v, enable_gqa=True, is_causal=L > 1)
        _check(q, k, v, enable_gqa=True, attn_mask=mask)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_long_cache_split_over_threads(isa, dtype):
    # few queries against a long cache: the keys are split over the threads and merged by lse
    B, Hq, Hkv, S, E = 1, 4, 1, 2100, 64
    q, k, v = make((B, Hq, 2, E), seed=1), make((B, Hkv, S, E), seed=2), make((B, Hkv, S, E), seed=3)
    mask = torch.rand(1, 1, 2, S) > 0.1
    mask[..., 1, :] = False
    mask[..., 1, 1500] = True  # row 1 keeps one key, far into the cache
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    with cpu_isa(isa):
        _check(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True, attn_mask=mask, rtol=tol, atol=tol)
        _check(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Dropout


def _dropout_probe(B, H, L, S, p, *, is_causal=False, seed=None, isa=None, dtype=torch.float32):
    """Runs ops.attention with a zero query (uniform probabilities) and V = identity, so that the
    output reveals the kernel's keep mask: out[i, j] = keep(i, j) / ((1 - p) * n_i), n_i the keys
    row i sees. Returns (q, k, v, out, keep)."""
    if seed is not None:
        torch.manual_seed(seed)
    q = _leaf(torch.zeros(B, H, L, 8, dtype=dtype))
    k = _leaf(make((B, H, S, 8), seed=2).to(dtype))
    v = _leaf(torch.eye(S, dtype=dtype).expand(B, H, S, S).contiguous())
    out = ops.attention(q, k, v, dropout_p=p, is_causal=is_causal)
    n = torch.full((L, 1), float(S), dtype=torch.float64)
    if is_causal:
        n = torch.clamp(torch.arange(L, dtype=torch.float64) + 1, max=S)[:, None]
    keep = (out.detach().double() * (1 - p) * n).round()
    assert ((keep == 0) | (keep == 1)).all()
    return q, k, v, out, keep.bool()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("L", [1, 40], ids=["decode", "tiled"])
def test_dropout_mask_statistics_and_seeds(isa, L):
    B, H, S, p = 2, 2, 200, 0.3
    with cpu_isa(isa):
        *_, keep1 = _dropout_probe(B, H, L, S, p, seed=11)
        *_, keep2 = _dropout_probe(B, H, L, S, p, seed=12)
        *_, keep1b = _dropout_probe(B, H, L, S, p, seed=11)
    n = keep1.numel()
    frac = keep1.double().mean().item()
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, frac
    assert torch.equal(keep1, keep1b)  # the same torch seed draws the same mask
    assert not torch.equal(keep1, keep2)  # different seeds differ
    assert (keep1 != keep2).double().mean() > 0.2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("L,is_causal", [(1, False), (3, True), (37, False), (37, True)])
def test_dropout_backward_uses_the_forward_mask(isa, L, is_causal):
    B, H, S, p = 1, 2, 70, 0.25
    with cpu_isa(isa):
        q, k, v, out, keep = _dropout_probe(B, H, L, S, p, is_causal=is_causal, seed=3, dtype=torch.float64)
        # random q/k/v are not needed to check the mask; the gradients must use exactly it
        g = make(tuple(out.shape), seed=9).double()
        got = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (_leaf(t.detach()) for t in (q, k, v))
    want = ref.attention(q64, k64, v64, dropout_p=p, is_causal=is_causal, dropout_mask=keep)
    exp = torch.autograd.grad(want, (q64, k64, v64), g)
    assert_matches_reference(out, want, rtol=1e-12, atol=1e-12, what="out")
    for name, a, b in zip("qkv", got, exp):
        assert_matches_reference(a, b, rtol=1e-10, atol=1e-12, what=f"grad {name}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("B,Hq,Hkv,L,S,causal", [(2, 4, 2, 1, 90, True), (2, 4, 2, 37, 90, True),
                                                 (1, 4, 1, 1, 1100, False)], ids=["decode", "tiled", "decode_split"])
def test_dropout_matches_philox_reference(isa, B, Hq, Hkv, L, S, causal):
    # the kernel's mask is the one reference.dropout_keep_mask recomputes (also for GQA, masks and
    # the decode path with its keys split over threads)
    E, p = 24, 0.4
    q, k, v = (make(s, dtype=torch.float64, seed=i) for i, s in enumerate([(B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, E)]))
    mask = torch.rand(B, 1, L, S) > 0.2
    seed = torch.tensor(987654321123, dtype=torch.int64)
    scale = E**-0.5
    with cpu_isa(isa):
        qd, kd, vd = (_leaf(t) for t in (q, k, v))
        out, lse = _ops.attention_fwd(qd, kd, vd, mask, p, causal, scale, seed)
        g = make(tuple(out.shape), dtype=torch.float64, seed=5)
        got = _ops.attention_bwd(g, qd, kd, vd, out, lse, mask, p, causal, scale, seed)
    keep = ref.dropout_keep_mask(seed, B * Hq, L, S, p).reshape(B, Hq, L, S)
    q64, k64, v64 = (_leaf(t) for t in (q, k, v))
    want = ref.attention(q64, k64, v64, mask, p, causal, enable_gqa=True, dropout_mask=keep)
    exp = torch.autograd.grad(want, (q64, k64, v64), g)
    assert_matches_reference(out, want, rtol=1e-12, atol=1e-12, what="out")
    for name, a, b in zip("qkv", got, exp):
        assert_matches_reference(a, b, rtol=1e-10, atol=1e-12, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Low precision: error <= 2 x PyTorch's own at that precision (+ a small absolute term)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("L,S,E", [(1, 150, 64), (45, 77, 40), (70, 70, 96)])
def test_low_precision(device, isa, dtype, L, S, E):
    B, H = 2, 2
    q, k, v = (make(s, dtype=dtype, device=device, seed=i) for i, s in enumerate([(B, H, L, E), (B, H, S, E), (B, H, S, E)]))
    mask = torch.rand(B, 1, L, S) > 0.2
    qd, kd, vd = (_leaf(t) for t in (q, k, v))
    qp, kp, vp = (_leaf(t) for t in (q, k, v))
    q64, k64, v64 = (_leaf(t.double().cpu()) for t in (q, k, v))
    g = make((B, H, L, E), dtype=dtype, device=device, seed=9)
    with cpu_isa(isa):
        out = ops.attention(qd, kd, vd, attn_mask=mask.to(device), is_causal=True)
        got = torch.autograd.grad(out, (qd, kd, vd), g)
    peer = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask.to(device), is_causal=True)
    peer_g = torch.autograd.grad(peer, (qp, kp, vp), g)
    want = ref.attention(q64, k64, v64, attn_mask=mask, is_causal=True)
    exp = torch.autograd.grad(want, (q64, k64, v64), g.double().cpu())
    assert out.dtype == dtype
    assert_matches_reference(out, want, peer, what="out")
    for name, a, p, b in zip("qkv", got, peer_g, exp):
        assert a.dtype == dtype
        assert_matches_reference(a, b, p, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# float64 gradcheck, opcheck, torch.compile


@pytest.mark.parametrize("isa", ISAS)
def test_gradcheck_float64(isa):
    def mk(*s):
        return torch.randn(*s, dtype=torch.float64, requires_grad=True)

    mask = torch.rand(1, 2, 5, 7) > 0.3
    mask[..., 2, :] = False
    with cpu_isa(isa):
        q, k, v = mk(1, 2, 5, 6), mk(1, 2, 7, 6), mk(1, 2, 7, 3)
        assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, attn_mask=mask), (q, k, v))
        assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, is_causal=True, scale=0.7), (q, k, v))
        q1, kg, vg = mk(1, 4, 1, 6), mk(1, 1, 9, 6), mk(1, 1, 9, 6)
        assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, enable_gqa=True), (q1, kg, vg))
        seed = torch.tensor(42)
        assert torch.autograd.gradcheck(
            lambda q, k, v: _ops.attention_fwd(q, k, v, None, 0.3, False, 0.5, seed)[0], (q, k, v))


def test_opcheck():
    seed = torch.tensor(7)
    q, k, v = make((2, 4, 9, 16), seed=1), make((2, 2, 13, 16), seed=2), make((2, 2, 13, 8), seed=3)
    mask = torch.rand(2, 1, 9, 13) > 0.3
    for args in [
        (q, k, v, None, 0.0, False, 0.25, None),
        (q, k, v, mask, 0.2, True, 0.25, seed),
        (q, k, v, torch.randn(9, 13), 0.0, False, 0.25, None),
    ]:
        grad_args = tuple(_leaf(t) for t in args[:3]) + args[3:]
        torch.library.opcheck(_ops.attention_fwd.default, grad_args)
        out, lse = _ops.attention_fwd(*args)
        g = torch.randn_like(out)
        torch.library.opcheck(_ops.attention_bwd.default, (g, q, k, v, out, lse) + args[3:])


def test_torch_compile_fullgraph():
    def f(q, k, v, mask):
        return ops.attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = make((1, 4, 10, 16), seed=1), make((1, 2, 12, 16), seed=2), make((1, 2, 12, 16), seed=3)
    mask = torch.rand(10, 12) > 0.2
    qa, ka, va = (_leaf(t) for t in (q, k, v))
    qb, kb, vb = (_leaf(t) for t in (q, k, v))
    got = compiled(qa, ka, va, mask)
    want = f(qb, kb, vb, mask)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (qa, ka, va)), torch.autograd.grad(want, (qb, kb, vb))):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Errors: a clear exception naming the argument


def _qkv(L=4, S=5, E=8, H=2, dtype=torch.float32):
    return make((1, H, L, E), dtype=dtype), make((1, H, S, E), dtype=dtype), make((1, H, S, E), dtype=dtype)


def test_error_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="key"):
        ops.attention(q, k.double(), v)
    with pytest.raises(TypeError, match="value"):
        ops.attention(q, k, v.half())
    with pytest.raises(TypeError, match="query"):
        ops.attention(q.int(), k.int(), v.int())
    with pytest.raises(TypeError, match="attn_mask"):
        ops.attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.int32))


def test_error_ranks_and_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query"):
        ops.attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    with pytest.raises(ValueError, match="number of dimensions"):
        ops.attention(q, k[0], v)
    with pytest.raises(ValueError, match="key"):
        ops.attention(q, make((1, 2, 5, 6)), v)
    with pytest.raises(ValueError, match="value"):
        ops.attention(q, k, make((1, 2, 6, 8)))
    with pytest.raises(ValueError, match="batch"):
        ops.attention(q, make((2, 2, 5, 8)), make((2, 2, 5, 8)))
    with pytest.raises(ValueError, match="enable_gqa"):
        ops.attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(make((1, 3, 4, 8)), k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="head dim"):
        ops.attention(*_qkv(E=257))
    with pytest.raises(ValueError, match="head dim of value"):
        ops.attention(q, k, make((1, 2, 5, 300)))


def test_error_masks_dropout_and_empty():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attn_mask"):
        ops.attention(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        ops.attention(q, k, v, attn_mask=torch.ones(2, 2, 2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        ops.attention(q, k, v, attn_mask=torch.zeros(4, 5, requires_grad=True))
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, k, v, dropout_p=-0.1)
    with pytest.raises(ValueError, match="query must not be empty"):
        ops.attention(make((1, 2, 0, 8)), k, v)
    with pytest.raises(ValueError, match="key must not be empty"):
        ops.attention(q, make((1, 2, 0, 8)), make((1, 2, 0, 8)))
    with pytest.raises(ValueError, match="query must not be empty"):
        ops.attention(make((0, 2, 4, 8)), make((0, 2, 5, 8)), make((0, 2, 5, 8)))


def test_error_backward_arguments():
    q, k, v = _qkv()
    out, lse = _ops.attention_fwd(q, k, v, None, 0.0, False, 0.5, None)
    with pytest.raises(ValueError, match="grad_out"):
        _ops.attention_bwd(out[..., :3], q, k, v, out, lse, None, 0.0, False, 0.5, None)
    with pytest.raises(ValueError, match="lse"):
        _ops.attention_bwd(out, q, k, v, out, lse.double(), None, 0.0, False, 0.5, None)
    with pytest.raises(ValueError, match="seed"):
        _ops.attention_fwd(q, k, v, None, 0.5, False, 0.5, None)


@skip_unless_cuda()
def test_error_device_mix():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="key"):
        ops.attention(q.cuda(), k, v.cuda())
    with pytest.raises(RuntimeError, match="attn_mask"):
        ops.attention(q.cuda(), k.cuda(), v.cuda(), attn_mask=torch.ones(4, 5, dtype=torch.bool))

"""fusedformer.nn.MultiheadAttention against torch.nn.MultiheadAttention: every mask kind and
combination, causal, kdim/vdim, bias_kv / zero_attn, weights, unbatched inputs; outputs and
gradients in train (dropout 0) and eval modes."""

import warnings

import pytest
import torch

import fusedformer.nn as fnn

N, L, S, E, H = 2, 6, 7, 16, 4


def _pair(**kw):
    ref = torch.nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = fnn.MultiheadAttention(E, H, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _attn_mask(kind, L, S, n=N, h=H):
    """torch.nn convention: bool True = masked out, float additive. Column 0 stays open so that no
    row is fully masked (torch gives NaN there, fusedformer zeros)."""
    if kind is None:
        return None
    shape = (L, S) if kind.endswith("2d") else (n * h, L, S)
    if kind.startswith("bool"):
        m = torch.rand(shape) < 0.4
        m[..., 0] = False
        return m
    m = torch.randn(shape)
    m = m.masked_fill(torch.rand(shape) < 0.3, float("-inf"))
    m[..., 0] = 0.5
    return m


def _padding_mask(kind, S, n=N):
    if kind is None:
        return None
    pad = torch.zeros(n, S, dtype=torch.bool)
    pad[0, S - 2 :] = True
    pad[1, S - 1] = True
    if kind == "bool":
        return pad
    return torch.randn(n, S).masked_fill(pad, float("-inf"))


def _inputs(batch_first, self_attn, kdim=E, vdim=E, unbatched=False):
    def t(length, dim):
        if unbatched:
            return torch.randn(length, dim, requires_grad=True)
        shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(shape, requires_grad=True)

    if self_attn:
        q = t(L, E)
        return q, q, q
    q = t(L, E)
    if kdim == vdim:
        mem = t(S, kdim)
        return q, mem, mem
    return q, t(S, kdim), t(S, vdim)


def _run(module, q, k, v, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(q, k, v, **kw)


def _compare(ours, ref, q, k, v, *, grads=True, atol=1e-5, **kw):
    out, w = _run(ours, q, k, v, **kw)
    out_ref, w_ref = _run(ref, q, k, v, **kw)
    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=atol)
    if w_ref is None:
        assert w is None
    else:
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=atol)
    if not grads or not torch.is_grad_enabled():
        return
    g = torch.randn_like(out)
    inputs = list({id(t): t for t in (q, k, v)}.values())
    got = torch.autograd.grad(out, inputs + list(ours.parameters()), g, allow_unused=True)
    want = torch.autograd.grad(out_ref, inputs + list(ref.parameters()), g, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


MASKS = [
    (None, None),
    ("bool2d", None),
    ("float2d", None),
    ("bool3d", None),
    ("float3d", None),
    (None, "bool"),
    (None, "float"),
    ("bool2d", "bool"),
    ("float2d", "bool"),
    ("bool2d", "float"),
    ("float2d", "float"),
    ("bool3d", "bool"),
    ("float3d", "float"),
]


@pytest.mark.parametrize("attn_kind,pad_kind", MASKS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_masks(attn_kind, pad_kind, batch_first, need_weights):
    ours, ref = _pair(batch_first=batch_first)
    q, k, v = _inputs(batch_first, True)
    _compare(ours, ref, q, k, v, attn_mask=_attn_mask(attn_kind, L, L), key_padding_mask=_padding_mask(pad_kind, L),
             need_weights=need_weights)


@pytest.mark.parametrize("attn_kind,pad_kind", [(None, None), ("bool2d", "bool"), ("float3d", "float"),
                                                ("bool3d", None), (None, "float")])
@pytest.mark.parametrize("kdim,vdim", [(E, E), (10, 12)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention(attn_kind, pad_kind, kdim, vdim, batch_first):
    ours, ref = _pair(batch_first=batch_first, kdim=kdim, vdim=vdim)
    q, k, v = _inputs(batch_first, False, kdim, vdim)
    _compare(ours, ref, q, k, v, attn_mask=_attn_mask(attn_kind, L, S), key_padding_mask=_padding_mask(pad_kind, S),
             need_weights=False)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("pad_kind", [None, "bool", "float"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_causal_hint(mask_dtype, pad_kind, need_weights, batch_first):
    ours, ref = _pair(batch_first=batch_first)
    q, k, v = _inputs(batch_first, True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    if mask_dtype == torch.bool:
        causal = torch.isinf(causal)
    _compare(ours, ref, q, k, v, attn_mask=causal, key_padding_mask=_padding_mask(pad_kind, L), is_causal=True,
             need_weights=need_weights)


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("attn_kind,pad_kind", [(None, None), ("bool2d", "bool"), ("float2d", None), (None, "float")])
@pytest.mark.parametrize("batch_first", [True, False])
def test_bias_kv_and_zero_attn(add_bias_kv, add_zero_attn, attn_kind, pad_kind, batch_first):
    ours, ref = _pair(batch_first=batch_first, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    q, k, v = _inputs(batch_first, True)
    for need_weights in (False, True):
        _compare(ours, ref, q, k, v, attn_mask=_attn_mask(attn_kind, L, L),
                 key_padding_mask=_padding_mask(pad_kind, L), need_weights=need_weights)


@pytest.mark.parametrize("pad_kind", [None, "bool"])
def test_bias_kv_with_causal_hint(pad_kind):
    """torch.nn applies the causal hint to the appended key column without a padding mask, and the
    (padded) mask with one; both choices are followed."""
    ours, ref = _pair(batch_first=True, add_bias_kv=True)
    q, k, v = _inputs(True, True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    _compare(ours, ref, q, k, v, attn_mask=causal, key_padding_mask=_padding_mask(pad_kind, L), is_causal=True,
             need_weights=False)


@pytest.mark.parametrize("average", [True, False])
def test_weights_per_head_and_averaged(average):
    ours, ref = _pair(batch_first=True)
    q, k, v = _inputs(True, False)
    _compare(ours, ref, q, k, v, need_weights=True, average_attn_weights=average,
             attn_mask=_attn_mask("float2d", L, S))


@pytest.mark.parametrize("self_attn", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched(self_attn, need_weights):
    ours, ref = _pair(batch_first=True)
    q, k, v = _inputs(True, self_attn, unbatched=True)
    s = L if self_attn else S
    pad = torch.zeros(s, dtype=torch.bool)
    pad[-1] = True
    _compare(ours, ref, q, k, v, key_padding_mask=pad, attn_mask=_attn_mask("bool3d", L, s, n=1),
             need_weights=need_weights)


def test_no_bias():
    ours, ref = _pair(batch_first=True, bias=False)
    assert ours.in_proj_bias is None
    q, k, v = _inputs(True, True)
    _compare(ours, ref, q, k, v, key_padding_mask=_padding_mask("bool", L), need_weights=False)


@pytest.mark.parametrize("self_attn", [True, False])
def test_eval_no_grad(self_attn):
    """In eval without grad, torch.nn takes its native fast path; the numbers agree."""
    ours, ref = _pair(batch_first=True)
    ours.eval()
    ref.eval()
    q, k, v = _inputs(True, self_attn)
    with torch.no_grad():
        _compare(ours, ref, q, k, v, key_padding_mask=_padding_mask("bool", S if not self_attn else L),
                 need_weights=False)


def test_larger_packed_and_split_projections_agree():
    """Past the block size the packed projection is split into three; the numbers do not change."""
    from fusedformer.ops import _blocks

    ours, ref = _pair(batch_first=True)
    q = torch.randn(3, 11, E)
    before = _blocks.MAX_BLOCK_BYTES
    try:
        _blocks.MAX_BLOCK_BYTES = 64  # force the split path
        out_split = ours(q, q, q, need_weights=False)[0]
    finally:
        _blocks.MAX_BLOCK_BYTES = before
    torch.testing.assert_close(out_split, ours(q, q, q, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_split, ref(q, q, q, need_weights=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_give_zeros(need_weights):
    """A query whose keys are all masked gets zero attention (so the output projection's bias) and
    finite gradients. torch.nn gives the same without weights (its fused kernel) and NaN with them."""
    ours, ref = _pair(batch_first=True)
    q = torch.randn(1, 3, E, requires_grad=True)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1] = True  # query 1 sees nothing
    out, w = ours(q, q, q, attn_mask=mask, need_weights=need_weights)
    out_ref, _ = ref(q, q, q, attn_mask=mask, need_weights=need_weights)
    assert torch.isnan(out_ref[0, 1]).all() == need_weights
    torch.testing.assert_close(out[0, 1], ours.out_proj.bias)
    torch.testing.assert_close(out[0, [0, 2]], out_ref[0, [0, 2]], rtol=1e-5, atol=1e-5)
    if need_weights:
        assert not w[0, 1].any()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_dropout_in_training():
    """Training-mode attention dropout: reproducible under torch.manual_seed, off in eval."""
    ours, _ = _pair(batch_first=True, dropout=0.5)
    q = torch.randn(N, L, E)
    torch.manual_seed(3)
    a = ours(q, q, q, need_weights=False)[0]
    torch.manual_seed(3)
    b = ours(q, q, q, need_weights=False)[0]
    torch.testing.assert_close(a, b)
    ours.eval()
    c = ours(q, q, q, need_weights=False)[0]
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_state_dict_round_trip():
    for kw in [dict(), dict(kdim=10, vdim=12), dict(add_bias_kv=True, bias=False)]:
        ref = torch.nn.MultiheadAttention(E, H, **kw)
        ours = fnn.MultiheadAttention(E, H, **kw)
        ours.load_state_dict(ref.state_dict(), strict=True)
        back = torch.nn.MultiheadAttention(E, H, **kw)
        back.load_state_dict(ours.state_dict(), strict=True)
        assert list(ours.state_dict()) == list(ref.state_dict())
        for a, b in zip(back.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (dict(query=torch.randn(2, 3, 4, E)), "query must be"),
    (dict(key=torch.randn(N, S, E + 1)), "key must have 16 features"),
    (dict(attn_mask=torch.zeros(L, L + 1, dtype=torch.bool)), "attn_mask: a 2-D mask must have shape"),
    (dict(attn_mask=torch.zeros(3, L, L, dtype=torch.bool)), "attn_mask: a 3-D mask must have shape"),
    (dict(key_padding_mask=torch.zeros(N, L + 2, dtype=torch.bool)), "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.zeros(N, L, dtype=torch.int64)), "key_padding_mask must be a bool or floating"),
])
def test_bad_input_is_a_clear_error(bad, match):
    ours, _ = _pair(batch_first=True)
    x = torch.randn(N, L, E)
    args = dict(query=x, key=x, value=x)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ours(**args)

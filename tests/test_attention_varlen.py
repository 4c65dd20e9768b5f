"""fusedformer.ops.attention_varlen (attention_varlen_fwd): packed sequences against the float64
reference run on each sequence alone, and against the padded layout with a key-padding mask."""

import math

import pytest
import torch
import torch.nn.functional as F

from fusedformer import ops
from fusedformer import reference as ref
from _util import ISAS, LOWP, assert_matches_reference, cpu_isa, make

_ops = torch.ops.fusedformer


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)


def _reference(q, k, v, lengths, is_causal=False, scale=None):
    """(T, H, Ev) float64: each sequence through the reference on its own rows."""
    outs, start = [], 0
    for n in lengths:
        if n == 0:
            continue
        qs, ks, vs = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))
        o = ref.attention(qs, ks, vs, is_causal=is_causal, scale=scale, enable_gqa=qs.size(0) != ks.size(0))
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs)


# (lengths, Hq, Hkv, E, Ev): several key blocks, a decode-sized sequence, empty sequences, GQA
CASES = [
    ([5, 1, 130, 64, 0, 17], 3, 3, 32, 32),
    ([200], 2, 2, 64, 64),
    ([1, 1, 1], 4, 2, 16, 16),
    ([0, 37, 0, 90], 6, 2, 40, 24),
    ([48, 49, 47], 2, 1, 8, 8),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0])) + f"_h{c[1]}x{c[2]}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_values_against_each_sequence(isa, case, is_causal):
    lengths, Hq, Hkv, E, Ev = case
    T = sum(lengths)
    q, k, v = make((T, Hq, E), seed=1), make((T, Hkv, E), seed=2), make((T, Hkv, Ev), seed=3)
    with cpu_isa(isa), torch.no_grad():
        out = ops.attention_varlen(q, k, v, _cu(lengths), is_causal=is_causal)
    assert out.shape == (T, Hq, Ev) and out.is_contiguous()
    assert_matches_reference(out, _reference(q, k, v, lengths, is_causal), what="out")


@pytest.mark.parametrize("isa", ISAS)
def test_views_of_a_packed_projection_equal_the_padded_masked_layout(isa):
    # the BERT use: q, k, v are column slices of one (T, 3 * D) projection; against the padded layout
    lengths, H, E = [7, 70, 33, 1], 4, 16
    D, B, L = H * E, len(lengths), max(lengths)
    qkv = make((sum(lengths), 3 * D), seed=4)
    q, k, v = (t.unflatten(-1, (H, E)) for t in qkv.split(D, dim=-1))
    assert not q.is_contiguous()
    padded = torch.zeros(B, L, 3 * D)
    keep = torch.zeros(B, L, dtype=torch.bool)
    start = 0
    for b, n in enumerate(lengths):
        padded[b, :n] = qkv[start:start + n]
        keep[b, :n] = True
        start += n
    pq, pk, pv = (t.unflatten(-1, (H, E)).transpose(1, 2) for t in padded.split(D, dim=-1))
    with cpu_isa(isa), torch.inference_mode():
        got = ops.attention_varlen(q, k, v, _cu(lengths).to(torch.int32), scale=0.3)
        dense = ops.attention(pq, pk, pv, attn_mask=keep[:, None, None, :], scale=0.3).transpose(1, 2)
    want = torch.cat([dense[b, :n] for b, n in enumerate(lengths)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_matches_reference(got, _reference(q, k, v, lengths, scale=0.3), what="out")


@pytest.mark.parametrize("dtype", [torch.float64] + LOWP, ids=["fp64", "bf16", "fp16"])
def test_other_dtypes(dtype):
    lengths, H, E = [3, 65, 20], 2, 24
    T = sum(lengths)
    q, k, v = (make((T, H, E), dtype=dtype, seed=i) for i in range(3))
    with torch.no_grad():
        out = ops.attention_varlen(q, k, v, _cu(lengths), is_causal=True)
    assert out.dtype == dtype
    want = _reference(q, k, v, lengths, is_causal=True)
    peer = torch.cat([F.scaled_dot_product_attention(*(t[s:s + n].transpose(0, 1) for t in (q, k, v)),
                                                     is_causal=True).transpose(0, 1)
                      for s, n in zip(_cu(lengths)[:-1].tolist(), lengths)])
    if dtype == torch.float64:
        assert_matches_reference(out, want, rtol=1e-12, atol=1e-12, what="out")
    else:
        assert_matches_reference(out, want, peer, what="out")


def test_opcheck_and_compile():
    lengths = [4, 9, 0, 2]
    q, k, v = make((15, 4, 16), seed=1), make((15, 2, 16), seed=2), make((15, 2, 8), seed=3)
    cu = _cu(lengths)
    torch.library.opcheck(_ops.attention_varlen_fwd.default, (q, k, v, cu, False, 0.25))
    torch.library.opcheck(_ops.attention_varlen_fwd.default, (q, k, v, cu, True, 0.25))

    def f(q, k, v, cu):
        return ops.attention_varlen(q, k, v, cu, is_causal=True).flatten(1).sum(-1)

    with torch.no_grad():
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu)
        torch.testing.assert_close(got, f(q, k, v, cu))


def test_nan_stays_in_its_sequence():
    lengths = [5, 6]
    q, k, v = (make((11, 2, 8), seed=i) for i in range(3))
    v[1, 0, 3] = float("nan")
    with torch.no_grad():
        out = ops.attention_varlen(q, k, v, _cu(lengths))
    # a NaN value feature reaches that feature of every query of its sequence and head, nothing else
    nan = out.isnan()
    assert nan[:5, 0, 3].all() and nan.sum() == 5



@pytest.mark.parametrize("path", ["op", "per_sequence"])
def test_errors_name_the_argument(path):
    # the CPU op without autograd, and the per-sequence path (autograd) with the same checks and messages
    q, k, v = (make((6, 2, 8), seed=i, requires_grad=path == "per_sequence") for i in range(3))
    cu = _cu([2, 4])
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of tokens"):
        ops.attention_varlen(q, k, v, _cu([2, 3]))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        ops.attention_varlen(q, k, v, torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must be nondecreasing"):
        ops.attention_varlen(q, k, v, torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D"):
        ops.attention_varlen(q, k, v, cu[None])
    with pytest.raises(TypeError, match="cu_seqlens must be int64 or int32"):
        ops.attention_varlen(q, k, v, cu.float())
    with pytest.raises(TypeError, match="cu_seqlens must be a tensor"):
        ops.attention_varlen(q, k, v, [0, 2, 6])
    with pytest.raises(ValueError, match=r"shape \(tokens, heads, head_dim\)"):
        ops.attention_varlen(q[0], k, v, cu)
    with pytest.raises(ValueError, match="same number of tokens"):
        ops.attention_varlen(q, k[:5], v, cu)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        ops.attention_varlen(make((6, 3, 8), requires_grad=q.requires_grad), k, v, cu)
    with pytest.raises(TypeError, match="key"):
        ops.attention_varlen(q, k.double(), v, cu)
    assert math.isfinite(float(ops.attention_varlen(q, k, v, cu).detach().sum()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[0])) + f"_h{c[1]}x{c[2]}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradients_per_sequence(case, is_causal):
    """With inputs that require grad, each sequence runs through the dense op (differentiable): the
    output equals the packed op's, and the gradients the float64 reference's, through views of one
    packed projection (as a model's q / k / v)."""
    lengths, Hq, Hkv, E, Ev = case
    T = sum(lengths)
    qkv = make((T, Hq * E + Hkv * (E + Ev)), seed=5, requires_grad=True)
    q, k, v = qkv.split((Hq * E, Hkv * E, Hkv * Ev), dim=-1)
    q, k, v = q.unflatten(-1, (Hq, E)), k.unflatten(-1, (Hkv, E)), v.unflatten(-1, (Hkv, Ev))
    out = ops.attention_varlen(q, k, v, _cu(lengths), is_causal=is_causal)
    assert out.shape == (T, Hq, Ev) and out.is_contiguous() and out.grad_fn is not None
    with torch.no_grad():
        torch.testing.assert_close(out, ops.attention_varlen(q, k, v, _cu(lengths), is_causal=is_causal),
                                   rtol=1e-6, atol=1e-6)
    g = make(out.shape, seed=6)
    (got,) = torch.autograd.grad(out, qkv, g)
    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.split((Hq * E, Hkv * E, Hkv * Ev), dim=-1)
    want_out = _reference(rq.unflatten(-1, (Hq, E)), rk.unflatten(-1, (Hkv, E)), rv.unflatten(-1, (Hkv, Ev)),
                          lengths, is_causal)
    (want,) = torch.autograd.grad(want_out, ref_qkv, g.double())
    assert_matches_reference(got, want, what="d qkv")


def test_gradcheck_per_sequence():
    q, k, v = (make((9, 2, 4), torch.float64, seed=i, requires_grad=True) for i in range(3))
    cu = _cu([3, 0, 5, 1])
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention_varlen(a, b, c, cu, is_causal=True), (q, k, v))


def test_other_devices_take_the_per_sequence_path():
    """Off the CPU each sequence is a call of the dense op (here on meta tensors: shapes only)."""
    q, k, v = make((15, 4, 16), seed=1), make((15, 2, 16), seed=2), make((15, 2, 8), seed=3)
    with torch.no_grad():
        out = ops.attention_varlen(q.to("meta"), k.to("meta"), v.to("meta"), _cu([4, 9, 0, 2]))
        assert out.device.type == "meta" and out.shape == (15, 4, 8)
        empty = ops.attention_varlen(q[:0].to("meta"), k[:0].to("meta"), v[:0].to("meta"), _cu([0]))
        assert empty.shape == (0, 4, 8)

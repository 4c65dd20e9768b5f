"""fusedformer.ops.paged_attention / paged_cache_write against the float64 references."""

import math

import pytest
import torch

from fusedformer import ops
from fusedformer import reference as ref
from _util import ISAS, LOWP, assert_matches_reference, cpu_isa, make, skip_unless_cuda

_ops = torch.ops.fusedformer


def _problem(seqs, *, Hq, Hkv, E, bs, dtype=torch.float32, seed=0, strided_query=False, spare_blocks=3,
             table_dtype=torch.int64):
    """A paged problem: seqs is a list of (q_len, seq_len); each sequence's blocks are drawn from a
    shuffled pool, the unused entries of its table row are -1 (never read). Returns the op's
    arguments (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-S // bs) for _, S in seqs]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    width = max(need + [1]) + 1
    tables = torch.full((len(seqs), width), -1, dtype=torch.int64)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n]
        used += n
    kc = make((num_blocks, Hkv, bs, E), dtype, seed=seed + 1)
    vc = make((num_blocks, Hkv, bs, E), dtype, seed=seed + 2)
    T = sum(L for L, _ in seqs)
    if strided_query:  # the query columns of a packed qkv projection
        qkv = make((T, Hq + 2 * Hkv, E), dtype, seed=seed + 3)
        q = qkv[:, :Hq]
        assert not q.is_contiguous()
    else:
        q = make((T, Hq, E), dtype, seed=seed + 3)
    starts = torch.tensor([0] + [L for L, _ in seqs]).cumsum(0)
    seq_lens = torch.tensor([S for _, S in seqs], dtype=torch.int64)
    return q, kc, vc, tables.to(table_dtype), seq_lens, starts


def _run(args, scale=None):
    with torch.no_grad():
        return ops.paged_attention(*args, scale=scale)


# name -> (seqs, Hq, Hkv, E, bs)
CASES = {
    "decode": ([(1, 17), (1, 1), (1, 1023), (1, 64)], 4, 4, 64, 16),
    "decode-gqa2-bs1": ([(1, 17), (1, 40), (1, 5)], 4, 2, 32, 1),
    "decode-gqa4-bs32": ([(1, 1023), (1, 17), (1, 1)], 8, 2, 80, 32),
    "prefill-chunks": ([(17, 17), (5, 40), (0, 9), (33, 1023)], 2, 2, 64, 16),
    "prefix-hit-gqa4": ([(7, 30), (1, 1), (0, 0), (20, 100)], 4, 1, 128, 32),
    "mixed-gqa2-bs1": ([(1, 17), (9, 9), (3, 70)], 6, 3, 80, 1),
    "long-split": ([(1, 2100)], 2, 1, 64, 16),
    "long-split-chunk": ([(3, 2100)], 2, 1, 32, 32),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_float32(case, isa):
    seqs, Hq, Hkv, E, bs = CASES[case]
    args = _problem(seqs, Hq=Hq, Hkv=Hkv, E=E, bs=bs, seed=len(case))
    with cpu_isa(isa):
        out = _run(args)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert_matches_reference(out, ref.paged_attention(*args), rtol=2e-5, atol=2e-5, what=case)


@pytest.mark.parametrize("case", ["decode", "prefill-chunks", "mixed-gqa2-bs1", "long-split"])
def test_float64_exact(case):
    seqs, Hq, Hkv, E, bs = CASES[case]
    args = _problem(seqs, Hq=Hq, Hkv=Hkv, E=E, bs=bs, dtype=torch.float64, seed=3)
    out = _run(args, scale=0.3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.paged_attention(*args, scale=0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", ["decode", "prefill-chunks", "decode-gqa4-bs32", "long-split"])
def test_low_precision(case, dtype):
    seqs, Hq, Hkv, E, bs = CASES[case]
    args = _problem(seqs, Hq=Hq, Hkv=Hkv, E=E, bs=bs, dtype=dtype, seed=5)
    out = _run(args)
    assert out.dtype == dtype
    peer = ref.paged_attention(*args, dtype=dtype)  # PyTorch's own computation in that dtype
    assert_matches_reference(out, ref.paged_attention(*args), peer, what=f"{case} {dtype}")


def test_strided_query_and_int32_tables():
    seqs = [(3, 20), (1, 33), (0, 4)]
    args = _problem(seqs, Hq=4, Hkv=2, E=64, bs=16, strided_query=True, table_dtype=torch.int32, seed=9)
    assert_matches_reference(_run(args), ref.paged_attention(*args), rtol=2e-5, atol=2e-5)


def test_no_queries():
    args = _problem([(0, 5), (0, 0)], Hq=2, Hkv=2, E=32, bs=16)
    out = _run(args)
    assert out.shape == (0, 2, 32)


def test_equals_dense_attention_on_gathered_cache():
    """Each sequence's rows equal fusedformer.ops.attention on its contiguous K/V with a bottom-right
    causal mask."""
    seqs = [(1, 50), (6, 6), (4, 37)]
    q, kc, vc, tables, seq_lens, starts = args = _problem(seqs, Hq=4, Hkv=2, E=64, bs=16, seed=11)
    out = _run(args)
    for b, (L, S) in enumerate(seqs):
        k = ref.gather_paged(kc, tables[b], S)
        v = ref.gather_paged(vc, tables[b], S)
        mask = torch.ones(L, S, dtype=torch.bool).tril(diagonal=S - L)
        with torch.no_grad():
            want = ops.attention(q[starts[b]:starts[b + 1]].transpose(0, 1), k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[starts[b]:starts[b + 1]], want.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cache_write_round_trip(dtype):
    Hkv, E, bs, nb = 3, 40, 16, 6
    kc = make((nb, Hkv, bs, E), dtype, seed=1)
    vc = make((nb, Hkv, bs, E), dtype, seed=2)
    T = 9
    qkv = make((T, 3 * Hkv * E), dtype, seed=3).view(T, 3 * Hkv, E)
    key, value = qkv[:, Hkv:2 * Hkv], qkv[:, 2 * Hkv:]  # strided: column slices of a qkv projection
    assert not key.is_contiguous()
    slots = torch.tensor([5, -1, 17, 95, 0, -1, 33, 16, 64], dtype=torch.int64)
    want_k, want_v = ref.paged_cache_write(key, value, kc, vc, slots)
    ops.paged_cache_write(key, value, kc, vc, slots)
    assert torch.equal(kc.double(), want_k) and torch.equal(vc.double(), want_v)
    for t, s in enumerate(slots.tolist()):  # read back by slot
        if s >= 0:
            assert torch.equal(kc[s // bs, :, s % bs], key[t]) and torch.equal(vc[s // bs, :, s % bs], value[t])


def test_cache_write_strided_cache_and_feature_stride():
    kc_big = make((4, 2, 8, 32), seed=1)
    kc, vc = kc_big[..., ::2], make((4, 2, 8, 16), seed=2)
    key = make((3, 2, 32), seed=3)[..., ::2]
    value = make((3, 2, 16), seed=4)
    slots = torch.tensor([3, 31, -5])
    want_k, want_v = ref.paged_cache_write(key, value, kc, vc, slots)
    ops.paged_cache_write(key, value, kc, vc, slots)
    assert torch.equal(kc.double(), want_k) and torch.equal(vc.double(), want_v)


def test_write_then_decode_matches_dense():
    """A sequence prefilled then decoded token by token through the paged ops equals causal attention
    over the whole sequence."""
    Hq, Hkv, E, bs, S = 4, 2, 32, 4, 11
    q, k, v = make((S, Hq, E), seed=1), make((S, Hkv, E), seed=2), make((S, Hkv, E), seed=3)
    kc, vc = torch.zeros(8, Hkv, bs, E), torch.zeros(8, Hkv, bs, E)
    table = torch.tensor([[6, 2, 7, 0]])
    slot = lambda j: table[0, j // bs].item() * bs + j % bs  # noqa: E731
    P = 6  # prefill P tokens in one call, then decode one at a time
    ops.paged_cache_write(k[:P], v[:P], kc, vc, torch.tensor([slot(j) for j in range(P)]))
    outs = [_run((q[:P], kc, vc, table, torch.tensor([P]), torch.tensor([0, P])))]
    for j in range(P, S):
        ops.paged_cache_write(k[j:j + 1], v[j:j + 1], kc, vc, torch.tensor([slot(j)]))
        outs.append(_run((q[j:j + 1], kc, vc, table, torch.tensor([j + 1]), torch.tensor([0, 1]))))
    with torch.no_grad():
        want = ops.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                             enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(torch.cat(outs), want, rtol=1e-5, atol=1e-5)


@skip_unless_cuda()
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda(case, dtype):
    """The CUDA kernel (split-K partials and their merge included) against the float64 reference."""
    seqs, Hq, Hkv, E, bs = CASES[case]
    args = _problem(seqs, Hq=Hq, Hkv=Hkv, E=E, bs=bs, dtype=dtype, seed=len(case) + 1)
    out = _run([a.cuda() for a in args])
    assert out.is_cuda and out.dtype == dtype and out.is_contiguous()
    peer = ref.paged_attention(*args, dtype=dtype) if dtype != torch.float32 else None
    assert_matches_reference(out.cpu(), ref.paged_attention(*args), peer, rtol=2e-5, atol=2e-5,
                             what=f"cuda {case} {dtype}")


@skip_unless_cuda()
def test_cuda_strided_query_int32_tables_and_cache_write():
    seqs = [(3, 20), (1, 33), (0, 4)]
    args = _problem(seqs, Hq=4, Hkv=2, E=64, bs=16, strided_query=True, table_dtype=torch.int32, seed=9)
    out = _run([a.cuda() for a in args])
    assert_matches_reference(out.cpu(), ref.paged_attention(*args), rtol=2e-5, atol=2e-5)
    for dtype in (torch.float32, torch.bfloat16):
        Hkv, E, bs, nb = 3, 40, 16, 6
        kc, vc = make((nb, Hkv, bs, E), dtype, seed=1), make((nb, Hkv, bs, E), dtype, seed=2)
        qkv = make((9, 3 * Hkv * E), dtype, seed=3).view(9, 3 * Hkv, E)
        key, value = qkv[:, Hkv:2 * Hkv], qkv[:, 2 * Hkv:]
        slots = torch.tensor([5, -1, 17, 95, 0, -1, 33, 16, 64], dtype=torch.int64)
        want_k, want_v = ref.paged_cache_write(key, value, kc, vc, slots)
        kcg, vcg = kc.cuda(), vc.cuda()
        ops.paged_cache_write(key.cuda(), value.cuda(), kcg, vcg, slots.cuda())
        assert torch.equal(kcg.cpu().double(), want_k) and torch.equal(vcg.cpu().double(), want_v)


def test_refuses_grad():
    args = list(_problem([(1, 5)], Hq=2, Hkv=2, E=16, bs=4))
    args[0] = args[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.paged_attention(*args)
    with torch.no_grad():
        assert ops.paged_attention(*args).shape == (1, 2, 16)


def test_opcheck():
    args = _problem([(1, 20), (3, 9), (0, 2)], Hq=4, Hkv=2, E=16, bs=4, seed=2)
    torch.library.opcheck(_ops.paged_attention.default, args + (0.25,))
    kc, vc = args[1].clone(), args[2].clone()
    key, value = make((3, 2, 16), seed=5), make((3, 2, 16), seed=6)
    torch.library.opcheck(_ops.paged_cache_write.default, (key, value, kc, vc, torch.tensor([0, -1, 7])))


def test_torch_compile_fullgraph():
    def step(q, k, v, kc, vc, slots, tables, seq_lens, starts):
        ops.paged_cache_write(k, v, kc, vc, slots)
        return ops.paged_attention(q, kc, vc, tables, seq_lens, starts).flatten(1).sum(-1)

    q, kc, vc, tables, seq_lens, starts = _problem([(1, 9), (2, 5)], Hq=2, Hkv=1, E=16, bs=4, seed=4)
    k, v = make((3, 1, 16), seed=7), make((3, 1, 16), seed=8)
    bs = kc.size(2)
    slots = torch.tensor([tables[0, 8 // bs] * bs + 8 % bs, tables[1, 3 // bs] * bs + 3 % bs,
                          tables[1, 4 // bs] * bs + 4 % bs])
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, kc, vc, slots, tables, seq_lens,
                                                                         starts)
        want = step(q, k, v, kc2, vc2, slots, tables, seq_lens, starts)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


# ---------------------------------------------------------------------------------------------
# Bad input: an exception naming the argument


def _good():
    return list(_problem([(2, 9), (1, 4)], Hq=4, Hkv=2, E=16, bs=4, seed=1))


def _with(i, value):
    a = _good()
    a[i] = value(a) if callable(value) else value
    return a


BAD_ATTENTION = {
    "query-dtype": (lambda: _with(0, lambda a: a[0].to(torch.int32)), TypeError, "query"),
    "query-rank": (lambda: _with(0, lambda a: a[0].flatten(1)), ValueError, "query"),
    "cache-dtype": (lambda: _with(1, lambda a: a[1].double()), TypeError, "key_cache"),
    "cache-rank": (lambda: _with(1, lambda a: a[1][0]), ValueError, "key_cache"),
    "value-shape": (lambda: _with(2, lambda a: a[2][:2]), ValueError, "value_cache"),
    "value-dtype": (lambda: _with(2, lambda a: a[2].half()), TypeError, "value_cache"),
    "head-dim": (lambda: _with(0, lambda a: make((3, 4, 8))), ValueError, "head dim"),
    "heads": (lambda: _with(0, lambda a: make((3, 3, 16))), ValueError, "key/value heads"),
    "tables-dtype": (lambda: _with(3, lambda a: a[3].float()), TypeError, "block_tables"),
    "tables-rows": (lambda: _with(3, lambda a: a[3][:1]), ValueError, "block_tables"),
    "tables-rank": (lambda: _with(3, lambda a: a[3].flatten()), ValueError, "block_tables"),
    "block-id": (lambda: _with(3, lambda a: a[3].masked_fill(a[3] == a[3][0, 0], 99)), ValueError, "block_tables"),
    "seq-lens-width": (lambda: _with(4, torch.tensor([9, 400])), ValueError, "seq_lens"),
    "seq-lens-negative": (lambda: _with(4, torch.tensor([9, -1])), ValueError, "seq_lens"),
    "seq-lens-count": (lambda: _with(4, torch.tensor([9, 4, 4])), ValueError, "seq_lens"),
    "q-len-over-context": (lambda: _with(4, torch.tensor([1, 4])), ValueError, "seq_lens"),
    "starts-count": (lambda: _with(5, torch.tensor([0, 3])), ValueError, "query_start_loc"),
    "starts-first": (lambda: _with(5, torch.tensor([1, 2, 3])), ValueError, "query_start_loc"),
    "starts-total": (lambda: _with(5, torch.tensor([0, 2, 2])), ValueError, "query_start_loc"),
    "starts-decreasing": (lambda: _with(5, torch.tensor([0, 4, 3])), ValueError, "query_start_loc"),
    "starts-float": (lambda: _with(5, torch.tensor([0.0, 2.0, 3.0])), TypeError, "query_start_loc"),
    "not-a-tensor": (lambda: _with(4, [9, 4]), TypeError, "seq_lens"),
    "cache-device": (lambda: _with(1, lambda a: a[1].to("meta")), RuntimeError, "key_cache"),
}


@pytest.mark.parametrize("case", list(BAD_ATTENTION))
def test_bad_attention_input(case):
    make_args, exc, name = BAD_ATTENTION[case]
    with pytest.raises(exc, match=name), torch.no_grad():
        ops.paged_attention(*make_args())


def _write_args():
    kc, vc = make((4, 2, 8, 16), seed=1), make((4, 2, 8, 16), seed=2)
    return [make((3, 2, 16), seed=3), make((3, 2, 16), seed=4), kc, vc, torch.tensor([0, 9, -1])]


def _write_with(i, value):
    a = _write_args()
    a[i] = value(a) if callable(value) else value
    return a


BAD_WRITE = {
    "key-dtype": (lambda: _write_with(0, lambda a: a[0].double()), TypeError, "key"),
    "key-shape": (lambda: _write_with(0, lambda a: make((3, 1, 16))), ValueError, "key"),
    "value-shape": (lambda: _write_with(1, lambda a: make((2, 2, 16))), ValueError, "value"),
    "cache-shape": (lambda: _write_with(3, lambda a: make((4, 2, 4, 16))), ValueError, "value_cache"),
    "slot-dtype": (lambda: _write_with(4, torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError, "slot_mapping"),
    "slot-count": (lambda: _write_with(4, torch.tensor([0, 1])), ValueError, "slot_mapping"),
    "slot-range": (lambda: _write_with(4, torch.tensor([0, 32, 1])), ValueError, "slot_mapping"),
}


@pytest.mark.parametrize("case", list(BAD_WRITE))
def test_bad_cache_write_input(case):
    make_args, exc, name = BAD_WRITE[case]
    args = make_args()
    before = args[2].clone()
    with pytest.raises(exc, match=name):
        ops.paged_cache_write(*args)
    assert torch.equal(args[2], before)  # nothing written

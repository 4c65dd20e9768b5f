"""CUDA-only cases: low precision against float64 with the 2 x PyTorch rule, long sequences, the
head dims of the tensor-core buckets, the decode path, determinism, dropout masks equal to the
CPU's, poisoned output buffers, and the GPU check's summary writer (which runs everywhere).

The per-op test files run their cases on every device of tests/_util.DEVICES, CUDA included.
"""

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fusedformer
import fusedformer.reference as ref
from _util import CUDA, LOWP, assert_matches_reference, make, max_err

cuda = pytest.mark.skipif(not CUDA, reason="CUDA not available")
ops = torch.ops.fusedformer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda(shape, dtype, seed, scale=1.0, requires_grad=False):
    return make(shape, dtype, "cuda", scale=scale, seed=seed, requires_grad=requires_grad)


def _sdpa_peer(q, k, v, **kw):
    """PyTorch's own low-precision run (the error the 2 x rule allows us)."""
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _attn_grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    return o.detach(), dq, dk, dv


def _ref_grads(q, k, v, g, **kw):
    """float64 attention and its gradients (on the GPU: float64 is exact enough and fast there)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    m = kw.get("attn_mask")
    if m is not None and m.is_floating_point():  # an additive mask: in the reference's precision
        kw = {**kw, "attn_mask": m.double()}
    o = F.scaled_dot_product_attention(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), g.double())
    return o.detach(), dq, dk, dv


def _check_attention(q, k, v, *, what, abs_scale=1.0, **kw):
    g = torch.randn(q.shape[:-1] + (v.size(-1),), device=q.device, dtype=q.dtype)
    ours = _attn_grads(lambda a, b, c: fusedformer.attention(a, b, c, **kw), q, k, v, g)
    peer = _attn_grads(lambda a, b, c: _sdpa_peer(a, b, c, **kw), q, k, v, g)
    want = _ref_grads(q, k, v, g, **kw)
    for name, o, p, w in zip(("out", "dq", "dk", "dv"), ours, peer, want):
        eps = torch.finfo(q.dtype).eps
        assert_matches_reference(o, w, p, what=f"{what} {name}",
                                 abs_term=abs_scale * eps * max(1.0, w.abs().max().item()))


# ---------------------------------------------------------------------------------------------
# attention: head dims, causal, GQA, low precision against float64


@cuda
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("E", [40, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_head_dims(dtype, E, causal):
    B, H, L, S = 2, 3, 200, 333 if not causal else 200
    q = _cuda((B, H, L, E), dtype, 1)
    k = _cuda((B, H, S, E), dtype, 2)
    v = _cuda((B, H, S, E), dtype, 3)
    _check_attention(q, k, v, is_causal=causal, what=f"E={E} causal={causal}")


@cuda
@pytest.mark.parametrize("dtype", LOWP)
def test_attention_gqa_and_value_dim(dtype):
    q = _cuda((2, 8, 130, 64), dtype, 4)
    k = _cuda((2, 2, 257, 64), dtype, 5)
    v = _cuda((2, 2, 257, 64), dtype, 6)
    _check_attention(q, k, v, enable_gqa=True, what="gqa")
    # E != Ev (both multiples of 8, different buckets)
    q2 = _cuda((1, 2, 96, 64), dtype, 7)
    k2 = _cuda((1, 2, 96, 64), dtype, 8)
    v2 = _cuda((1, 2, 96, 160), dtype, 9)
    _check_attention(q2, k2, v2, is_causal=True, what="Ev=160")


@cuda
@pytest.mark.parametrize("dtype", LOWP)
def test_attention_masks_low_precision(dtype):
    B, H, L, S, E = 2, 4, 150, 190, 64
    q, k, v = (_cuda((B, H, n, E), dtype, s) for n, s in ((L, 10), (S, 11), (S, 12)))
    keep = torch.rand(B, 1, L, S, device="cuda") > 0.3
    keep[:, :, 5] = False  # a fully masked row: zeros, zero gradients
    ours = fusedformer.attention(q, k, v, attn_mask=keep)
    assert torch.all(ours[:, :, 5] == 0)
    add = torch.randn(1, H, L, S, device="cuda", dtype=dtype)
    for m in (keep[:, :, 6:7].expand(B, 1, L, S).contiguous(), add):
        _check_attention(q, k, v, attn_mask=m, what=f"mask {m.dtype}", abs_scale=2.0)


@cuda
@pytest.mark.parametrize("dtype", LOWP)
def test_attention_long_sequence_16k(dtype):
    B, H, L, E = 1, 2, 16384, 64
    q, k, v = (_cuda((B, H, L, E), dtype, s) for s in (20, 21, 22))
    for causal in (False, True):
        _check_attention(q, k, v, is_causal=causal, what=f"16k causal={causal}")


@cuda
def test_attention_fully_masked_rows_and_lse():
    q, k, v = (_cuda((1, 2, 70, 64), torch.bfloat16, s) for s in (30, 31, 32))
    keep = torch.ones(1, 2, 70, 70, dtype=torch.bool, device="cuda")
    keep[0, 1, 7] = False
    out, lse = ops.attention_fwd(q, k, v, keep, 0.0, False, 0.125, None)
    assert torch.all(out[0, 1, 7] == 0)
    assert lse.dtype == torch.float32 and torch.isinf(lse[0, 1, 7]) and lse[0, 1, 7] > 0
    assert torch.isfinite(lse[0, 1, :7]).all()
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = fusedformer.attention(qg, kg, vg, attn_mask=keep)
    o.sum().backward()
    assert torch.all(qg.grad[0, 1, 7] == 0)
    assert not any(torch.isnan(t.grad).any() for t in (qg, kg, vg))


@cuda
def test_attention_nan_propagates():
    q, k, v = (_cuda((1, 1, 40, 64), torch.bfloat16, s) for s in (33, 34, 35))
    q[0, 0, 3, 5] = float("nan")
    out = fusedformer.attention(q, k, v)
    assert torch.isnan(out[0, 0, 3]).all()
    assert not torch.isnan(out[0, 0, 4]).any()


# ---------------------------------------------------------------------------------------------
# decode (few query rows, long cache) and the float32 / float64 / fallback paths


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("S", [8192, 32768])
def test_attention_decode(dtype, S):
    B, Hq, Hkv, E = 2, 8, 2, 128
    k = _cuda((B, Hkv, S, E), dtype, 40)
    v = _cuda((B, Hkv, S, E), dtype, 41)
    for L in (1, 2):
        q = _cuda((B, Hq, L, E), dtype, 42 + L)
        ours = fusedformer.attention(q, k, v, enable_gqa=True)
        want = ref.attention(q, k, v, enable_gqa=True)
        peer = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert_matches_reference(ours, want, peer, what=f"decode L={L} S={S}", rtol=1e-4, atol=1e-5)


@cuda
def test_attention_decode_mask_and_causal_match_general_path():
    # the decode kernel against the tensor-core kernel (one more query row than decode takes)
    B, H, S, E = 1, 4, 3000, 64
    k, v = (_cuda((B, H, S, E), torch.float16, s) for s in (50, 51))
    q = _cuda((B, H, 9, E), torch.float16, 52)
    keep = torch.rand(B, H, 9, S, device="cuda") > 0.5
    full = fusedformer.attention(q, k, v, attn_mask=keep, is_causal=True)
    for L in (1, 8):
        part = fusedformer.attention(q[:, :, :L], k, v, attn_mask=keep[:, :, :L], is_causal=True)
        torch.testing.assert_close(part.float(), full[:, :, :L].float(), rtol=2e-3, atol=2e-3)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_simt_dtypes(dtype):
    q = _cuda((2, 3, 37, 40), dtype, 60, requires_grad=True)
    k = _cuda((2, 3, 45, 40), dtype, 61, requires_grad=True)
    v = _cuda((2, 3, 45, 24), dtype, 62, requires_grad=True)
    for causal in (False, True):
        out = fusedformer.attention(q, k, v, is_causal=causal)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        want = _ref_grads(q, k, v, g, is_causal=causal)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        for a, w in zip((out,) + grads, want):
            torch.testing.assert_close(a.double(), w, rtol=tol, atol=tol)


@cuda
def test_attention_gradcheck_float64():
    q = _cuda((1, 2, 6, 8), torch.float64, 63, requires_grad=True)
    k = _cuda((1, 2, 7, 8), torch.float64, 64, requires_grad=True)
    v = _cuda((1, 2, 7, 8), torch.float64, 65, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fusedformer.attention(a, b, c, is_causal=True), (q, k, v))


@cuda
def test_attention_odd_head_dim_and_noncontiguous():
    # E = 20 is not a multiple of 8 (SIMT fallback); non-contiguous inputs take a copy or strides
    q = make((2, 2, 33, 20), torch.bfloat16, "cuda", seed=70, noncontig=True)
    k = make((2, 2, 50, 20), torch.bfloat16, "cuda", seed=71, noncontig=True)
    v = make((2, 2, 50, 64), torch.bfloat16, "cuda", seed=72, noncontig=True)
    _check_attention(q, k, v, what="E=20 noncontig")
    q = make((2, 2, 33, 64), torch.bfloat16, "cuda", seed=73, noncontig=True)
    k = make((2, 2, 50, 64), torch.bfloat16, "cuda", seed=74, noncontig=True)
    _check_attention(q, k, v, what="noncontig tensor cores")


# ---------------------------------------------------------------------------------------------
# dropout: the CUDA keep mask is the CPU's, for the same seed


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [2, 77])
def test_dropout_mask_matches_reference(dtype, L):
    B, H, S, E, p = 2, 2, 91, 64, 0.3
    q, k = _cuda((B, H, L, E), dtype, 80), _cuda((B, H, S, E), dtype, 81)
    v = _cuda((B, H, S, E), dtype, 82)
    seed = torch.tensor(123456789012345, dtype=torch.int64)
    out, _ = ops.attention_fwd(q, k, v, None, p, False, 1 / 8, seed)
    keep = ref.dropout_keep_mask(seed, B * H, L, S, p).view(B, H, L, S)
    want = ref.attention(q, k, v, dropout_p=p, scale=1 / 8, dropout_mask=keep)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol)
    # the CPU kernel draws the same mask
    out_cpu, _ = ops.attention_fwd(q.cpu(), k.cpu(), v.cpu(), None, p, False, 1 / 8, seed)
    torch.testing.assert_close(out.cpu().double(), out_cpu.double(), rtol=tol, atol=tol)


@cuda
def test_dropout_backward_uses_the_forward_mask():
    B, H, L, S, E, p = 1, 2, 70, 90, 64, 0.25
    q, k, v = (_cuda((B, H, n, E), torch.float32, s) for n, s in ((L, 83), (S, 84), (S, 85)))
    seed = torch.tensor(42, dtype=torch.int64)
    keep = ref.dropout_keep_mask(seed, B * H, L, S, p).view(B, H, L, S)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, _ = ops.attention_fwd(qg, kg, vg, None, p, False, 0.125, seed)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qg, kg, vg), g)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    want = ref.attention(q64, k64, v64, dropout_p=p, scale=0.125, dropout_mask=keep)
    wgrads = torch.autograd.grad(want, (q64, k64, v64), g.cpu().double())
    for a, w in zip(grads, wgrads):
        torch.testing.assert_close(a.cpu().double(), w, rtol=1e-4, atol=1e-5)
    # bf16 (tensor-core kernels) against the same float64 gradients
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    outb, _ = ops.attention_fwd(qb, kb, vb, None, p, False, 0.125, seed)
    gb = torch.autograd.grad(outb, (qb, kb, vb), g.to(torch.bfloat16))
    for a, w in zip(gb, wgrads):
        torch.testing.assert_close(a.cpu().double(), w, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# softmax and the norms in low precision, large rows


@cuda
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("n", [7, 1000, 4096, 70000])
def test_softmax_low_precision(dtype, n):
    x = _cuda((64 if n < 70000 else 3, n), dtype, 90, scale=3.0)
    ours = fusedformer.softmax(x, -1)
    assert_matches_reference(ours, ref.softmax(x, -1), torch.softmax(x, -1), what=f"softmax n={n}")
    g = torch.randn_like(x)
    y = torch.softmax(x.double(), -1)
    want = y * (g.double() - (g.double() * y).sum(-1, keepdim=True))
    peer = torch._softmax_backward_data(g, torch.softmax(x, -1), -1, dtype)
    assert_matches_reference(ops.softmax_bwd(g, ours, -1, 1.0), want, peer, what=f"softmax bwd n={n}")


@cuda
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("n", [8, 768, 4096, 40000])
def test_norms_low_precision(dtype, n):
    rows = 50 if n < 40000 else 3
    x = _cuda((rows, n), dtype, 91)
    r = _cuda((rows, n), dtype, 92)
    w = _cuda((n,), dtype, 93)
    b = _cuda((n,), dtype, 94)
    ours, h = fusedformer.layer_norm(x, n, w, b, residual=r)
    want, _ = ref.layer_norm(x, n, w, b, residual=r)
    assert_matches_reference(ours, want, F.layer_norm(x + r, (n,), w, b), what=f"layer_norm n={n}")
    assert torch.equal(h, x + r)
    ours = fusedformer.rms_norm(x, n, w)
    assert_matches_reference(ours, ref.rms_norm(x, n, w), F.rms_norm(x, (n,), w), what=f"rms_norm n={n}")
    # input and weight gradients against float64 autograd
    eps = torch.finfo(dtype).eps
    norms = {
        "layer_norm": (lambda a, c: fusedformer.layer_norm(a, n, c, b), lambda a, c: F.layer_norm(a, (n,), c, b.to(a.dtype))),
        "rms_norm": (lambda a, c: fusedformer.rms_norm(a, n, c), lambda a, c: F.rms_norm(a, (n,), c, eps)),
    }
    g = torch.randn_like(x)
    for name, (fn, peer) in norms.items():
        grads = _norm_grads(fn, x, w, g)
        pgrads = _norm_grads(peer, x, w, g)
        wgrads = _norm_grads(peer, x.double(), w.double(), g.double())
        for gname, a, pg, wg in zip(("dx", "dw"), grads, pgrads, wgrads):
            assert_matches_reference(a, wg, pg, what=f"{name} {gname} n={n}",
                                     abs_term=4 * eps * max(1.0, wg.abs().max().item()))


def _norm_grads(fn, x, w, g):
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    return torch.autograd.grad(fn(xs, ws), (xs, ws), g)


# ---------------------------------------------------------------------------------------------
# determinism of the deterministic paths


@cuda
def test_norm_backward_is_deterministic():
    x = _cuda((4096, 1024), torch.bfloat16, 100)
    w = _cuda((1024,), torch.float32, 101)
    b = _cuda((1024,), torch.float32, 102)
    g = _cuda((4096, 1024), torch.bfloat16, 103)
    _, _, mean, rstd = ops.layer_norm_fwd(x, [1024], w, b, 1e-5, None)
    first = ops.layer_norm_bwd(g, None, x, mean, rstd, w, True, [1024])
    for _ in range(3):
        again = ops.layer_norm_bwd(g, None, x, mean, rstd, w, True, [1024])
        for a, c in zip(first, again):
            assert torch.equal(a, c)
    _, _, rs = ops.rms_norm_fwd(x, [1024], w, 1e-6, None)
    first = ops.rms_norm_bwd(g, None, x, rs, w, [1024])
    again = ops.rms_norm_bwd(g, None, x, rs, w, [1024])
    assert all(torch.equal(a, c) for a, c in zip(first, again))


@cuda
def test_norm_backward_absent_grads_do_not_alias():
    """Without weight and bias, layer_norm_bwd returns two empty gradients: distinct tensors, as
    opcheck requires of an op's outputs (the CPU's case is in test_norms.test_opcheck)."""
    x = _cuda((4, 2, 9), torch.float32, 104)
    r = _cuda((4, 2, 9), torch.float32, 105)
    g = torch.randn_like(x)
    _, _, mean, rstd = ops.layer_norm_fwd(x, [9], None, None, 1e-5, None)
    _, gw, gb = ops.layer_norm_bwd(g, r, x, mean, rstd, None, False, [9])
    assert gw.numel() == 0 and gb.numel() == 0
    assert gw is not gb
    assert gw.untyped_storage()._cdata != gb.untyped_storage()._cdata
    torch.library.opcheck(ops.layer_norm_bwd.default, (g, r, x, mean, rstd, None, False, [9]))
    _, _, rstd = ops.rms_norm_fwd(x, [9], None, 1e-5, None)
    torch.library.opcheck(ops.rms_norm_bwd.default, (g, r, x, rstd, None, [9]))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_backward_deterministic_mode(dtype):
    B, H, L, E = 2, 4, 700, 128
    q, k, v = (_cuda((B, H, L, E), dtype, s) for s in (110, 111, 112))
    g = _cuda((B, H, L, E), dtype, 113)
    out, lse = ops.attention_fwd(q, k, v, None, 0.0, True, 0.1, None)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = ops.attention_bwd(g, q, k, v, out, lse, None, 0.0, True, 0.1, None)
        for _ in range(3):
            again = ops.attention_bwd(g, q, k, v, out, lse, None, 0.0, True, 0.1, None)
            assert all(torch.equal(a, c) for a, c in zip(first, again))
    finally:
        torch.use_deterministic_algorithms(before)
    # the default (atomic) path computes the same gradients up to rounding
    loose = ops.attention_bwd(g, q, k, v, out, lse, None, 0.0, True, 0.1, None)
    for a, c in zip(first, loose):
        torch.testing.assert_close(a.float(), c.float(), rtol=1e-2, atol=1e-2)
    # the forward and the softmax are deterministic always
    assert torch.equal(ops.attention_fwd(q, k, v, None, 0.0, True, 0.1, None)[0], out)
    x = _cuda((300, 5000), dtype, 114)
    assert torch.equal(fusedformer.softmax(x), fusedformer.softmax(x))


# ---------------------------------------------------------------------------------------------
# every element of every output is written: outputs land in memory that held NaN


def _poison_allocator(nbytes_list):
    """Fill and free blocks of these sizes so that the caching allocator hands them out next."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((max(1, n // 4),), float("nan"), device="cuda") for n in nbytes_list for _ in range(3)]
    del blocks


def _assert_written(*tensors):
    for t in tensors:
        if t.numel() and t.is_floating_point():
            assert not torch.isnan(t).any(), "an output element was not written"


@cuda
def test_poisoned_outputs_are_fully_written():
    cases = []
    x = _cuda((33, 1001), torch.bfloat16, 120)
    cases.append(lambda: ops.softmax_fwd(x, -1, 1.0, None, True))
    cases.append(lambda: ops.softmax_bwd(x, x, -1, 1.0))
    w = _cuda((1001,), torch.bfloat16, 121)
    cases.append(lambda: ops.layer_norm_fwd(x, [1001], w, w, 1e-5, x))
    cases.append(lambda: ops.rms_norm_fwd(x, [1001], w, 1e-5, x))
    xs = x.float()
    _, _, m, r = ops.layer_norm_fwd(x, [1001], w, w, 1e-5, None)
    cases.append(lambda: ops.layer_norm_bwd(x, x, x, m, r, w, True, [1001]))
    for dtype, E, L in ((torch.bfloat16, 80, 100), (torch.float16, 256, 65), (torch.float32, 40, 30),
                        (torch.bfloat16, 128, 1)):
        q = _cuda((2, 4, L, E), dtype, 122)
        k = _cuda((2, 4, 4000, E), dtype, 123)
        v = _cuda((2, 4, 4000, E), dtype, 124)
        cases.append(lambda q=q, k=k, v=v: ops.attention_fwd(q, k, v, None, 0.0, False, 0.1, None))

        def bwd(q=q, k=k, v=v):
            o, lse = ops.attention_fwd(q, k, v, None, 0.0, False, 0.1, None)
            return ops.attention_bwd(o, q, k, v, o, lse, None, 0.0, False, 0.1, None)

        cases.append(bwd)
    del xs
    for fn in cases:
        outs = fn()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        sizes = [t.numel() * t.element_size() for t in outs]
        del outs
        _poison_allocator(sizes)
        outs = fn()
        _assert_written(*(outs if isinstance(outs, (tuple, list)) else (outs,)))


# ---------------------------------------------------------------------------------------------
# same errors as the CPU


@cuda
def test_errors_match_cpu():
    q = torch.randn(1, 2, 8, 16, device="cuda")
    k = torch.randn(1, 2, 8, 16, device="cuda", dtype=torch.float16)
    msgs = []
    for dev_q, dev_k in ((q, k), (q.cpu(), k.cpu())):
        with pytest.raises(TypeError) as e:
            fusedformer.attention(dev_q, dev_k, dev_k)
        msgs.append(str(e.value).replace("cuda:0", "").replace("cpu", ""))
    assert msgs[0].split("\n")[0] == msgs[1].split("\n")[0]
    with pytest.raises(RuntimeError, match="device"):
        fusedformer.attention(q, q.cpu(), q.cpu())
    with pytest.raises(ValueError, match="normalized_shape"):
        fusedformer.layer_norm(q, [7])


# ---------------------------------------------------------------------------------------------
# the GPU check's summary writer (no GPU needed)


def _load_summary_module():
    path = os.path.join(ROOT, "scripts", "gpu_summary.py")
    spec = importlib.util.spec_from_file_location("gpu_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_summary_writer(tmp_path):
    mod = _load_summary_module()
    (tmp_path / "steps.tsv").write_text("build\t0\t95.2\ntest\t1\t130.0\nmemcheck\t0\t40.1\nbench\t124\t150.0\n")
    (tmp_path / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" '
        'skipped="2" time="3.0"></testsuite></testsuites>')
    (tmp_path / "memcheck.log").write_text("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "racecheck.log").write_text("========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n")
    (tmp_path / "cuda-kernels.md").write_text("| op | dir |\n|---|---|\n| softmax | fwd |\n")
    (tmp_path / "info.txt").write_text("device: NVIDIA H100\ntorch: 2.11.0+cu130\ncommit: abc123\n")
    results = tmp_path / "results"
    rc = mod.main(["--dir", str(tmp_path), "--results", str(results), "--slug", "h200"])
    assert rc == 0
    md = (tmp_path / "summary.md").read_text()
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["tests"] == {"total": 10, "passed": 7, "failed": 1, "errors": 0, "skipped": 2}
    assert data["sanitizer"]["memcheck"] == "0 errors"
    assert data["sanitizer"]["racecheck"].startswith("2 hazards")
    assert data["steps"]["bench"]["status"] == "timed out"
    assert data["steps"]["test"]["status"] == "failed (rc 1)"
    assert "NVIDIA H100" in md and "| softmax | fwd |" in md and "abc123" in md
    assert (results / "cuda-h200-summary.md").read_text() == md


def test_gpu_summary_writer_missing_inputs(tmp_path):
    mod = _load_summary_module()
    assert mod.main(["--dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["tests"] is None and data["sanitizer"] == {"memcheck": "not run", "racecheck": "not run"}
    assert "not run" in (tmp_path / "summary.md").read_text()


def test_gpu_check_script_arguments():
    import subprocess

    script = os.path.join(ROOT, "scripts", "gpu_check.sh")
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--steps" in out.stdout
    bad = subprocess.run(["bash", script, "--steps", "bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown step" in bad.stderr


def test_error_paths_script(capsys):
    """scripts/cuda_error_paths.py (the GPU check's bad-input step), run on the CPU: each case in a
    child process ends in the expected exception; an unknown case name is refused."""
    spec = importlib.util.spec_from_file_location("cuda_error_paths", os.path.join(ROOT, "scripts", "cuda_error_paths.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--cases", "linear in_features,attention dtype"]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 error paths raised the expected exception on cpu" in out and "FAIL" not in out
    with pytest.raises(SystemExit):
        mod.main(["--cases", "no such case"])

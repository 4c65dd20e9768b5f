"""Property tests: every op, forward and backward, on random shapes, dtypes, strides and masks,
against the float64 reference (fusedformer.reference) with the pass rule of the op tests
(_util.assert_matches_reference).

Each example is a plain dict (shapes, dtypes, layouts, a seed); the tensors are built from it, so the
falsifying example hypothesis prints, pasted into ``run_case(...)``, reproduces a failure, and the
exact call is printed too. Examples per test: 25 in CI (profile "ci"), or
``FUSEDFORMER_FUZZ_EXAMPLES=N`` for a deep run (profile "deep", which also keeps hypothesis's
database so a failure is replayed first next time).
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import note as _hyp_note
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st

import fusedformer
from fusedformer import reference as ref
from _util import ISAS, assert_matches_reference, cpu_isa

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
if os.environ.get("FUSEDFORMER_FUZZ_EXAMPLES"):
    settings.register_profile("deep", max_examples=int(os.environ["FUSEDFORMER_FUZZ_EXAMPLES"]), **_COMMON)
PROFILE = settings.get_profile("deep" if os.environ.get("FUSEDFORMER_FUZZ_EXAMPLES") else "ci")

FLOATS = ["float32", "bfloat16", "float16", "float64"]
LAYOUTS = ["contiguous", "transposed", "strided", "offset", "expanded"]
# elements of the largest tensor an example touches (the float64 reference runs on it too)
MAX_NUMEL = 1 << 17
MAX_ATTN_WORK = 1 << 21  # B * Hq * L * S * max(E, Ev)

# ---------------------------------------------------------------------------------------------
# tensors from a description


def note(text):
    """Printed with a falsifying example; printed directly when run_case reproduces one."""
    try:
        _hyp_note(text)
    except InvalidArgument:
        print(text)


def dt(name):
    return getattr(torch, name)


def build(shape, dtype, layout, seed, *, scale=1.0):
    """A tensor of `shape` and `dtype` whose memory layout is `layout`:
    contiguous; transposed (last two dims swapped in memory); strided (every other element of the
    last dim); offset (a view starting inside a larger storage); expanded (size-1 dims broadcast with
    stride 0: dim 0 when it is > 1, else contiguous)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=torch.float64)
        return (base * scale).to(dt(dtype)).transpose(-1, -2)
    if layout == "strided":
        base = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)
        return (base * scale).to(dt(dtype))[..., ::2]
    if layout == "offset":
        n = math.prod(shape)
        base = torch.randn(n + 3, generator=g, dtype=torch.float64)
        return (base * scale).to(dt(dtype))[3:].view(shape)
    if layout == "expanded" and len(shape) >= 2 and shape[0] > 1:
        base = torch.randn(1, *shape[1:], generator=g, dtype=torch.float64)
        return (base * scale).to(dt(dtype)).expand(shape)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt(dtype))


def build_mask(kind, shape, dtype, seed):
    """bool (True = keep, ~1/4 masked, some rows fully masked), additive (normal), or additive with
    -inf entries; `shape` broadcasts to the op's logits."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        keep = torch.rand(*shape, generator=g) > 0.25
        if len(shape) >= 2 and shape[-2] > 1:
            keep[..., 0, :] = False  # a fully masked row (zeros out, zero gradients)
        return keep
    m = torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "neginf":
        m = m.masked_fill(torch.rand(*shape, generator=g) < 0.3, float("-inf"))
    return m.to(dt(dtype))


def leaf(t, grad):
    """A leaf with the same values and strides (a view of a non-grad base is a leaf)."""
    t = t.detach()
    return t.requires_grad_(grad)


def f64_leaf(t):
    return t.detach().to(torch.float64).contiguous().requires_grad_(True)


def describe(t):
    if t is None:
        return "None"
    return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype}, stride={t.stride()}, offset={t.storage_offset()})"


def check(ours, ref64, peer, what, *, grad=False, prec=None):
    """float64: near-exact; float32: relative 1e-5 of the largest value (1e-4 for gradients, which
    sum over rows); bfloat16/float16: at most twice the error of PyTorch's own low-precision run.
    `prec` is the op's dtype: a float32 result computed from low-precision values (the gradient of
    a float32 mask of a bfloat16 softmax) is judged at that precision."""
    if prec in (torch.bfloat16, torch.float16) and ours.dtype == torch.float32:
        ours = ours.to(prec)
        peer = peer.to(prec) if peer is not None else None
    if ours.dtype == torch.float64:
        tol = 1e-9 * max(1.0, ref64.abs().max().item())
        assert_matches_reference(ours, ref64, rtol=1e-9, atol=tol, what=what)
    elif ours.dtype == torch.float32:
        rel = 1e-4 if grad else 1e-5
        assert_matches_reference(ours, ref64, rtol=rel, atol=rel * max(1.0, ref64.abs().max().item()), what=what)
    else:
        assert_matches_reference(ours, ref64, peer, what=what)


def grads_of(outs, inputs, seed, rounding):
    """Gradients of sum(out * w) for fixed random w (same w for every run with the same seed),
    w rounded to the `rounding` dtype so that every run sees the same values."""
    g = torch.Generator().manual_seed(seed + 7)
    loss = 0
    for o in outs:
        w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(rounding).to(o.dtype)
        loss = loss + (o * w).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# strategies


@st.composite
def broadcast_of(draw, shape):
    """A shape that broadcasts to `shape`: some trailing dims, each kept or set to 1."""
    k = draw(st.integers(1, len(shape)))
    return tuple(s if draw(st.booleans()) else 1 for s in shape[len(shape) - k :])


def bounded_dims(draw, rank, cap, last_max):
    dims = []
    budget = cap
    for i in range(rank):  # the last dim first
        hi = last_max if i == 0 else 9
        hi = max(1, min(hi, budget))
        d = draw(st.integers(1, hi))
        dims.insert(0, d)
        budget //= d
    return dims


@st.composite
def softmax_cases(draw):
    rank = draw(st.integers(1, 4))
    n_max = draw(st.sampled_from([8, 64, 2048]))
    shape = bounded_dims(draw, rank, MAX_NUMEL // 4, n_max)
    dim = draw(st.integers(-rank, rank - 1))
    causal = rank >= 2 and draw(st.booleans())
    mask_kind = draw(st.sampled_from([None, "bool", "additive", "neginf"]))
    dtype = draw(st.sampled_from(FLOATS))
    return dict(
        shape=shape,
        dtype=dtype,
        layout=draw(st.sampled_from(LAYOUTS)),
        dim=dim,
        scale=draw(st.sampled_from([1.0, 0.125, 3.0])),
        is_causal=causal,
        mask=mask_kind,
        mask_shape=draw(broadcast_of(shape)) if mask_kind else None,
        mask_dtype=draw(st.sampled_from([dtype, "float32"])) if mask_kind not in (None, "bool") else None,
        mask_grad=mask_kind in ("additive",) and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        isa=draw(st.sampled_from(ISAS)),
    )


@st.composite
def norm_cases(draw):
    k = draw(st.integers(1, 2))  # dims of normalized_shape
    rank = draw(st.integers(k, 4))
    n_max = draw(st.sampled_from([8, 96, 2048]))
    shape = bounded_dims(draw, rank, MAX_NUMEL // 4, n_max)
    return dict(
        rms=draw(st.booleans()),
        shape=shape,
        k=k,
        dtype=draw(st.sampled_from(FLOATS)),
        param_dtype=draw(st.sampled_from([None, "float32"])),  # None: the input's dtype
        layout=draw(st.sampled_from(LAYOUTS)),
        weight=draw(st.booleans()),
        bias=draw(st.booleans()),
        residual=draw(st.sampled_from([None, "contiguous", "transposed"])),
        eps=draw(st.sampled_from([1e-5, 1e-6, 0.1, None])),
        mean_shift=draw(st.sampled_from([0.0, 3.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        isa=draw(st.sampled_from(ISAS)),
    )


@st.composite
def attention_cases(draw):
    rank = draw(st.integers(2, 5))
    ratio = draw(st.sampled_from([1, 1, 2, 3, 4, 8])) if rank >= 3 else 1
    hkv = draw(st.integers(1, 3)) if rank >= 3 else 1
    hq = hkv * ratio
    batch = [draw(st.integers(1, 3)) for _ in range(max(0, rank - 3))]
    E = draw(st.one_of(st.integers(1, 256), st.sampled_from([40, 64, 80, 96, 112, 128])))
    Ev = E if draw(st.booleans()) else draw(st.integers(1, 256))
    long = draw(st.sampled_from(["short", "long_q", "long_k"]))
    bh = math.prod(batch) * hq
    budget = max(1, MAX_ATTN_WORK // (bh * max(E, Ev)))
    if long == "short":
        L = draw(st.integers(1, 70))
        S = draw(st.integers(1, 70))
    else:
        big = draw(st.integers(1, min(2048, budget)))
        small = draw(st.integers(1, max(1, min(40, budget // big))))
        L, S = (big, small) if long == "long_q" else (small, big)
    heads = [hq] if rank >= 3 else []
    kheads = [hkv] if rank >= 3 else []
    qshape = batch + heads + [L, E]
    mask_kind = draw(st.sampled_from([None, "bool", "additive", "neginf"]))
    logits_shape = batch + heads + [L, S]
    dtype = draw(st.sampled_from(FLOATS))
    return dict(
        q=qshape,
        k=batch + kheads + [S, E],
        v=batch + kheads + [S, Ev],
        dtype=dtype,
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        mask=mask_kind,
        mask_shape=draw(broadcast_of(logits_shape)) if mask_kind else None,
        mask_dtype=draw(st.sampled_from([dtype, "float32"])) if mask_kind not in (None, "bool") else None,
        is_causal=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5])),
        enable_gqa=ratio > 1,
        seed=draw(st.integers(0, 2**31 - 1)),
        isa=draw(st.sampled_from(ISAS)),
    )


# ---------------------------------------------------------------------------------------------
# the cases


def _low_softmax(z, dim):
    """softmax in z's dtype where an all -inf row gives zeros (PyTorch's own low-precision run)."""
    all_masked = torch.isneginf(z).all(dim=dim, keepdim=True)
    return torch.softmax(z.masked_fill(all_masked, 0.0), dim=dim).masked_fill(all_masked, 0.0)


def _apply_mask(z, mask, is_causal):
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.to(z.dtype)
    if is_causal:
        L, S = z.shape[-2], z.shape[-1]
        z = z.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    return z


def run_softmax(c):
    x = leaf(build(c["shape"], c["dtype"], c["layout"], c["seed"], scale=2.0), True)
    mask = build_mask(c["mask"], c["mask_shape"], c["mask_dtype"], c["seed"] + 1) if c["mask"] else None
    if mask is not None and c["mask_grad"]:
        mask.requires_grad_(True)
    kw = dict(dim=c["dim"], scale=c["scale"], mask=mask, is_causal=c["is_causal"])
    note(f"fusedformer.ops.softmax({describe(x)}, dim={c['dim']}, scale={c['scale']}, mask={describe(mask)}, "
         f"is_causal={c['is_causal']})")
    y = fusedformer.ops.softmax(x, **kw)
    inputs = [x] + ([mask] if c["mask_grad"] else [])
    grads = grads_of([y], inputs, c["seed"], dt(c["dtype"]))

    x64 = f64_leaf(x)
    m64 = f64_leaf(mask) if c["mask_grad"] else mask
    # the reference, differentiable in float64 (reference.softmax detaches its inputs)
    y64 = _ref_softmax_diff(x64, m64, c)
    ref_in = [x64] + ([m64] if c["mask_grad"] else [])
    grads64 = grads_of([y64], ref_in, c["seed"], dt(c["dtype"]))
    torch.testing.assert_close(y64.detach(), ref.softmax(x, **kw), rtol=1e-12, atol=1e-12)

    peer = peer_grads = None
    if y.dtype in (torch.bfloat16, torch.float16):
        xp = leaf(x.clone(), True)
        mp = leaf(mask.clone(), True) if c["mask_grad"] else mask
        zp = _apply_mask(xp * c["scale"], mp, c["is_causal"])
        yp = _low_softmax(_move(zp, c), -1)
        yp = _unmove(yp, c)
        peer = yp.detach()
        peer_grads = grads_of([yp], [xp] + ([mp] if c["mask_grad"] else []), c["seed"], dt(c["dtype"]))
    check(y, y64.detach(), peer, "softmax output")
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        check(g, g64, peer_grads[i] if peer_grads else None, f"softmax grad {i}", grad=True, prec=dt(c["dtype"]))


def _move(z, c):
    return z.movedim(c["dim"], -1)


def _unmove(z, c):
    return z.movedim(-1, c["dim"])


def _ref_softmax_diff(x64, m64, c):
    z = _apply_mask(x64 * c["scale"], m64.to(torch.float64) if m64 is not None and m64.dtype != torch.bool else m64,
                    c["is_causal"])
    return _unmove(_low_softmax(_move(z, c), -1), c)


def run_norm(c):
    dtype = dt(c["dtype"])
    shape = c["shape"]
    nshape = shape[len(shape) - c["k"] :]
    x = leaf(build(shape, c["dtype"], c["layout"], c["seed"], scale=2.0) + c["mean_shift"], True)
    pdt = c["param_dtype"] or c["dtype"]
    w = leaf(build(nshape, pdt, "contiguous", c["seed"] + 1) + 1.0, True) if c["weight"] else None
    b = leaf(build(nshape, pdt, "contiguous", c["seed"] + 2), True) if c["bias"] and not c["rms"] else None
    r = leaf(build(shape, c["dtype"], c["residual"], c["seed"] + 3), True) if c["residual"] else None
    eps = c["eps"] if c["eps"] is not None or c["rms"] else 1e-5
    name = "rms_norm" if c["rms"] else "layer_norm"
    params = [w] if c["rms"] else [w, b]
    note(f"fusedformer.ops.{name}({describe(x)}, {nshape}, " + ", ".join(describe(p) for p in params)
         + f", eps={eps}, residual={describe(r)})")
    fn = getattr(fusedformer.ops, name)
    out = fn(x, nshape, *params, eps, residual=r)
    outs = list(out) if r is not None else [out]
    inputs = [t for t in [x, w, b, r] if t is not None]
    grads = grads_of(outs, inputs, c["seed"], dt(c["dtype"]))

    ref_inputs = [f64_leaf(t) for t in inputs]
    m = dict(zip([id(t) for t in inputs], ref_inputs))
    x64, w64, b64, r64 = (m.get(id(t)) if t is not None else None for t in (x, w, b, r))
    if r64 is not None:
        # the unfused code adds in the input dtype; the reference normalizes that rounded sum
        h_low = (x.detach() + r.detach()).to(torch.float64)
        h64 = x64 + r64
        h64 = h64 + (h_low - h64).detach()
    else:
        h64 = x64
    ref_eps = eps if eps is not None else torch.finfo(dtype).eps
    o64 = _norm64(h64, nshape, w64, b64, ref_eps, c["rms"])
    outs64 = [o64, h64] if r is not None else [o64]
    grads64 = grads_of(outs64, ref_inputs, c["seed"], dt(c["dtype"]))
    expect = getattr(ref, name)(x, nshape, *params, eps, residual=r)
    torch.testing.assert_close(o64.detach(), expect[0] if r is not None else expect, rtol=1e-12, atol=1e-12)

    peer = peer_grads = None
    if dtype in (torch.bfloat16, torch.float16):
        pin = [leaf(t.clone(), True) for t in inputs]
        pm = dict(zip([id(t) for t in inputs], pin))
        xp, wp, bp, rp = (pm.get(id(t)) if t is not None else None for t in (x, w, b, r))
        hp = xp + rp if rp is not None else xp
        op = _norm_peer(hp, nshape, wp, bp, ref_eps, c["rms"])
        peer = [op.detach(), hp.detach()]
        peer_grads = grads_of([op, hp] if r is not None else [op], pin, c["seed"], dt(c["dtype"]))
    for i, o in enumerate(outs):
        check(o, outs64[i].detach(), peer[i] if peer else None, f"{name} output {i}")
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        check(g, g64, peer_grads[i] if peer_grads else None, f"{name} grad {i}", grad=True, prec=dt(c["dtype"]))


def _norm64(h, nshape, w, b, eps, rms):
    if rms:
        dims = tuple(range(-len(nshape), 0))
        o = h * torch.rsqrt(h.pow(2).mean(dim=dims, keepdim=True) + eps)
        return o * w if w is not None else o
    return torch.nn.functional.layer_norm(h, nshape, w, b, eps)


def _norm_peer(h, nshape, w, b, eps, rms):
    """PyTorch's own low-precision norm (parameters in the input's dtype, as torch requires)."""
    w = w.to(h.dtype) if w is not None else None
    b = b.to(h.dtype) if b is not None else None
    if rms:
        return torch.nn.functional.rms_norm(h, nshape, w, eps)
    return torch.nn.functional.layer_norm(h, nshape, w, b, eps)


def run_attention(c):
    q, k, v = (
        leaf(build(c[n], c["dtype"], lay, c["seed"] + i), True) for i, (n, lay) in enumerate(zip("qkv", c["layouts"]))
    )
    mask = build_mask(c["mask"], c["mask_shape"], c["mask_dtype"], c["seed"] + 5) if c["mask"] else None
    kw = dict(attn_mask=mask, is_causal=c["is_causal"], scale=c["scale"], enable_gqa=c["enable_gqa"])
    note(f"fusedformer.ops.attention({describe(q)}, {describe(k)}, {describe(v)}, attn_mask={describe(mask)}, "
         f"is_causal={c['is_causal']}, scale={c['scale']}, enable_gqa={c['enable_gqa']})")
    out = fusedformer.ops.attention(q, k, v, **kw)
    grads = grads_of([out], [q, k, v], c["seed"], dt(c["dtype"]))
    q64, k64, v64 = (f64_leaf(t) for t in (q, k, v))
    o64 = _attn_math(q64, k64, v64, mask, c)
    grads64 = grads_of([o64], [q64, k64, v64], c["seed"], dt(c["dtype"]))
    torch.testing.assert_close(o64.detach(), ref.attention(q, k, v, **kw), rtol=1e-12, atol=1e-12)
    peer = peer_grads = None
    if out.dtype != torch.float32:
        qp, kp, vp = (leaf(t.clone(), True) for t in (q, k, v))
        op = _attn_math(qp, kp, vp, mask, c)
        peer = op.detach()
        peer_grads = grads_of([op], [qp, kp, vp], c["seed"], dt(c["dtype"]))
    check(out, o64.detach(), peer, "attention output")
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        check(g, g64, peer_grads[i] if peer_grads else None, f"attention grad {'qkv'[i]}", grad=True)


def _attn_math(q, k, v, mask, c):
    """Attention in q's dtype, differentiable; fully masked rows give zeros."""
    if q.dim() >= 3 and k.size(-3) != q.size(-3):
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scale = c["scale"] if c["scale"] is not None else 1.0 / math.sqrt(q.size(-1))
    z = _apply_mask((q @ k.transpose(-2, -1)) * scale, mask, c["is_causal"])
    return _low_softmax(z, -1) @ v


@PROFILE
@given(softmax_cases())
def test_softmax_fuzz(case):
    run_case(case)


@PROFILE
@given(norm_cases())
def test_norm_fuzz(case):
    run_case(case)


@PROFILE
@given(attention_cases())
def test_attention_fuzz(case):
    run_case(case)


def run_case(case):
    """Reproduce one falsifying example: from the tests folder,
    ``python -c "from test_fuzz import run_case; run_case({...})"`` with the printed case."""
    run = run_attention if "q" in case else run_norm if "rms" in case else run_softmax
    note(f"instruction set {case['isa']}")
    with cpu_isa(case["isa"]):
        run(case)

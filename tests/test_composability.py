"""The ops inside PyTorch's machinery: torch.compile(fullgraph=True), gradcheck, opcheck,
activation checkpointing, autocast, inference_mode and deterministic mode, for every op."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fusedformer
from fusedformer import ops


def _inputs(dtype=torch.float32, seed=0, small=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    if small:
        return {
            "x": r(2, 3, 5), "mask": r(3, 5), "h": r(3, 6), "res": r(3, 6), "w": r(6), "b": r(6),
            "q": r(1, 2, 3, 4), "k": r(1, 1, 4, 4), "v": r(1, 1, 4, 3),
        }
    return {
        "x": r(2, 4, 17, 33), "mask": r(17, 33), "h": r(3, 17, 40), "res": r(3, 17, 40), "w": r(40), "b": r(40),
        "q": r(2, 4, 17, 40), "k": r(2, 2, 23, 40), "v": r(2, 2, 23, 24),
    }


def _run(op, t, dropout_p=0.0):
    """The op on inputs `t` (a dict), every optional argument in use."""
    if op == "softmax":
        return ops.softmax(t["x"], scale=0.5, mask=t["mask"], is_causal=True)
    if op == "softmax_dim0":
        return ops.softmax(t["x"], dim=0, mask=t["mask"] > 0)
    if op == "layer_norm":
        return ops.layer_norm(t["h"], t["h"].shape[-1], t["w"], t["b"], 1e-5, residual=t["res"])
    if op == "rms_norm":
        return ops.rms_norm(t["h"], t["h"].shape[-1], t["w"], residual=t["res"])
    if op == "attention":
        return ops.attention(t["q"], t["k"], t["v"], is_causal=True, enable_gqa=True, dropout_p=dropout_p)
    raise ValueError(op)


OPS = ["softmax", "softmax_dim0", "layer_norm", "rms_norm", "attention"]
GRAD_ARGS = {
    "softmax": ["x", "mask"],
    "softmax_dim0": ["x"],
    "layer_norm": ["h", "res", "w", "b"],
    "rms_norm": ["h", "res", "w"],
    "attention": ["q", "k", "v"],
}


def _leaves(t, op):
    return {k: v.clone().requires_grad_(k in GRAD_ARGS[op]) for k, v in t.items()}


def _outs(y):
    return list(y) if isinstance(y, tuple) else [y]


def _fwd_bwd(fn, op, t):
    leaves = _leaves(t, op)
    outs = _outs(fn(leaves))
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [leaves[k] for k in GRAD_ARGS[op]])
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph(op):
    torch._dynamo.reset()
    t = _inputs()
    eager = _fwd_bwd(lambda a: _run(op, a), op, t)
    compiled = torch.compile(lambda a: _run(op, a), fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(compiled, op, t)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_inductor_all_ops():
    """One graph of every op through inductor (dynamic=False), forward and backward."""
    torch._dynamo.reset()
    t = _inputs()

    def block(a):
        h, r = ops.layer_norm(a["h"], 40, a["w"], a["b"], residual=a["res"])
        h = ops.rms_norm(h, 40, a["w"]) + r
        q = h.view(3, 1, 17, 40).expand(3, 2, 17, 40)
        att = ops.attention(q, q, q, is_causal=True)
        return ops.softmax(att, mask=a["h"][0].detach() > 0) * 2

    eager = _fwd_bwd(block, "layer_norm", t)
    got = _fwd_bwd(torch.compile(block, fullgraph=True, dynamic=False), "layer_norm", t)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["softmax", "softmax_dim0", "layer_norm", "rms_norm", "attention"])
def test_gradcheck_float64(op):
    leaves = _leaves(_inputs(torch.float64, small=True), op)
    names = GRAD_ARGS[op]

    def f(*args):
        return _run(op, {**leaves, **dict(zip(names, args))})

    assert torch.autograd.gradcheck(f, [leaves[k] for k in names], eps=1e-6, atol=1e-7, rtol=1e-6)


def test_opcheck_every_op():
    t = _inputs(small=True)
    r = torch.ops.fusedformer
    cases = [
        (r.softmax_fwd.default, (t["x"], -1, 0.5, t["mask"], True)),
        (r.softmax_fwd.default, (t["x"], 0, 1.0, t["mask"] > 0, False)),
        (r.layer_norm_fwd.default, (t["h"], [6], t["w"], t["b"], 1e-5, t["res"])),
        (r.rms_norm_fwd.default, (t["h"], [6], t["w"], 1e-6, None)),
        (r.attention_fwd.default, (t["q"], t["k"], t["v"], None, 0.0, True, 0.5, None)),
    ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in args)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("op", OPS)
def test_checkpoint_matches(op):
    t = _inputs(seed=3)
    plain = _fwd_bwd(lambda a: _run(op, a), op, t)
    ckpt = _fwd_bwd(lambda a: checkpoint(lambda b: _run(op, b), a, use_reentrant=False), op, t)
    for a, b in zip(ckpt, plain):
        assert torch.equal(a, b)


def test_checkpoint_recomputes_attention_dropout():
    """The recomputed forward draws the same dropout seed (checkpoint restores the RNG state), so the
    checkpointed gradients equal the plain ones bit for bit."""
    t = _inputs(seed=4)
    torch.manual_seed(11)
    plain = _fwd_bwd(lambda a: _run("attention", a, dropout_p=0.3), "attention", t)
    torch.manual_seed(11)
    ckpt = _fwd_bwd(
        lambda a: checkpoint(lambda b: _run("attention", b, dropout_p=0.3), a, use_reentrant=False), "attention", t
    )
    for a, b in zip(ckpt, plain):
        assert torch.equal(a, b)
    torch.manual_seed(12)
    other = _fwd_bwd(lambda a: _run("attention", a, dropout_p=0.3), "attention", t)
    assert not torch.equal(other[0], plain[0])  # dropout is really in use


def test_autocast_attention_runs_in_lower_precision():
    t = _leaves(_inputs(seed=5), "attention")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.attention(t["q"], t["k"], t["v"], is_causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    expect = ops.attention(*(t[k].detach().bfloat16() for k in "qkv"), is_causal=True, enable_gqa=True)
    assert torch.equal(out, expect)
    out.float().sum().backward()
    for k in "qkv":  # gradients reach the float32 leaves through the casts
        assert t[k].grad is not None and t[k].grad.dtype == torch.float32 and torch.isfinite(t[k].grad).all()


def test_autocast_attention_inputs_from_linear():
    """The usual case: q, k, v from nn.Linear under autocast are already bfloat16; a float32 mask is
    accepted as is."""
    lin = torch.nn.Linear(40, 40)
    x = torch.randn(2, 17, 40)
    mask = torch.randn(17, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = lin(x).view(2, 17, 2, 20).transpose(1, 2)
        out = ops.attention(q, q, q, attn_mask=mask)
        peer = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert out.dtype == peer.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), peer.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rms", [False, True])
def test_autocast_norm_promotes_mixed_residual(rms):
    t = _inputs(seed=6)
    h16 = t["h"].bfloat16().requires_grad_(True)
    res = t["res"].clone().requires_grad_(True)
    norm = ops.rms_norm if rms else ops.layer_norm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, hsum = norm(h16, 40, t["w"], eps=1e-5, residual=res)
    assert out.dtype == hsum.dtype == torch.float32
    expect_out, expect_h = norm(h16.detach().float(), 40, t["w"], eps=1e-5, residual=res.detach())
    assert torch.equal(out, expect_out) and torch.equal(hsum, expect_h)
    (out.sum() + hsum.sum()).backward()
    assert h16.grad.dtype == torch.bfloat16 and res.grad.dtype == torch.float32
    # without autocast the same mix is an error naming the argument
    with pytest.raises(TypeError, match="residual"):
        norm(h16, 40, t["w"], residual=res)


@pytest.mark.parametrize("op", ["softmax", "layer_norm", "rms_norm"])
def test_autocast_keeps_input_dtype(op):
    t = _inputs(seed=7)
    t_bf = {k: (v.bfloat16() if k in ("x", "h", "res") else v) for k, v in t.items()}
    for inputs in (t, t_bf):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _outs(_run(op, inputs))
        expect = _outs(_run(op, inputs))
        for a, b in zip(got, expect):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_inference_mode(op):
    t = _inputs(seed=8)
    expect = _outs(_run(op, t))
    with torch.inference_mode():
        inf_inputs = {k: v.clone() for k, v in t.items()}  # inference tensors
        got = _outs(_run(op, inf_inputs))
    for a, b in zip(got, expect):
        assert a.is_inference() and not a.requires_grad
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_deterministic_algorithms(op):
    t = _inputs(seed=9)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_fwd_bwd(lambda a: _run(op, a), op, t) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def test_double_backward_is_refused_clearly():
    """The backward ops have no derivative of their own: asking for a second derivative raises."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = ops.softmax(x)
    (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="softmax_bwd: double backward"):
        torch.autograd.grad(g.sum(), x)
    h = torch.randn(3, 8, requires_grad=True)
    for y in (ops.layer_norm(h, 8), ops.rms_norm(h, 8), ops.attention(h.view(1, 3, 8), h.view(1, 3, 8), h.view(1, 3, 8))):
        (g,) = torch.autograd.grad((y * y).sum(), h, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(g.sum(), h)

"""fusedformer.ops.linear_cross_entropy (the LM head fused into the loss) and its row op
fusedformer::cross_entropy_rows: values and gradients against float64 F.cross_entropy(F.linear(...)),
every dtype and instruction set, ignored rows, chunking, the long-row path, errors, opcheck, and
GPT.loss against the logits path."""

import pytest
import torch
import torch.nn.functional as F

import fusedformer
from fusedformer.ops import _blocks
from _util import ISAS, assert_matches_reference, cpu_isa, make, skip_unless_cuda

_ops = torch.ops.fusedformer


def _loss_and_grads(x, w, b, t, *, fused, dtype=None, **kw):
    """The loss and the gradients (input, weight, bias) by autograd on copies of the arguments (cast to
    ``dtype`` when given): of fusedformer's op (``fused``) or of F.cross_entropy(F.linear(...)), in
    float64 (the reference) or at the inputs' precision (PyTorch's own run, the peer)."""
    leaves = [a.detach().to(dtype or a.dtype, copy=True).requires_grad_() for a in (x, w, b) if a is not None]
    xl, wl, bl = leaves[0], leaves[1], leaves[2] if b is not None else None
    if fused:
        loss = fusedformer.ops.linear_cross_entropy(xl, wl, t, bl, **kw)
    else:
        loss = F.cross_entropy(F.linear(xl, wl, bl).flatten(0, -2), t.flatten(), **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _ours(x, w, b, t, **kw):
    return _loss_and_grads(x, w, b, t, fused=True, **kw)


def _check(x, w, b, t, **kw):
    loss, grads = _ours(x, w, b, t, **kw)
    ref_loss, ref_grads = _loss_and_grads(x, w, b, t, fused=False, dtype=torch.float64, **kw)
    peer_loss, peer_grads = (None, [None] * len(ref_grads))
    if x.dtype in (torch.bfloat16, torch.float16):
        peer_loss, peer_grads = _loss_and_grads(x, w, b, t, fused=False, **kw)
    assert loss.dtype == x.dtype
    assert_matches_reference(loss, ref_loss.reshape(loss.shape), peer_loss, rtol=1e-5, atol=1e-5, what="loss")
    for name, g, r, p in zip(("input", "weight", "bias"), grads, ref_grads, peer_grads):
        assert g.dtype == x.dtype and g.shape == r.shape, name
        assert_matches_reference(g, r, p, rtol=1e-4, atol=1e-6, what=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_grads(dtype, reduction, bias):
    x = make((3, 17, 24), dtype, seed=1)
    w = make((1023, 24), dtype, seed=2, scale=0.3)
    b = make((1023,), dtype, seed=3) if bias else None
    t = torch.randint(0, 1023, (3, 17), generator=torch.Generator().manual_seed(4))
    t[0, :5] = -100
    _check(x, w, b, t, reduction=reduction)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("V", [1, 7, 40000])  # 40000: rows longer than the kernel's in-cache row
def test_instruction_sets_and_vocab_sizes(isa, V):
    with cpu_isa(isa):
        x = make((2, 5, 16), seed=5)
        w = make((V, 16), seed=6, scale=0.5)
        t = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
        if V > 3:
            t[1, 0] = 3  # an ignore_index other than the default
        _check(x, w, None, t, ignore_index=3 if V > 3 else -100)


@skip_unless_cuda()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [7, 1023, 40000])  # 40000: the long-row path of the CUDA row kernel
def test_cuda(dtype, V):
    x = make((2, 9, 24), dtype, "cuda", seed=V)
    w = make((V, 24), dtype, "cuda", seed=V + 1, scale=0.3)
    b = make((V,), dtype, "cuda", seed=V + 2)
    t = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(V)).cuda()
    t[1, :3] = -100
    _check(x, w, b, t)
    _check(x, w, None, t, reduction="sum")


def test_chunks(monkeypatch):
    """Rows in several chunks (and a ragged last one) give the one-chunk result."""
    x, w = make((67, 8), seed=8), make((100, 8), seed=9)
    t = torch.randint(0, 100, (67,), generator=torch.Generator().manual_seed(10))
    one = _ours(x, w, None, t)
    monkeypatch.setattr(_blocks, "MAX_BLOCK_BYTES", 10 * 100 * 4)  # 10 rows a chunk
    assert _blocks.row_blocks(67, 100, torch.float32) == 10
    many = _ours(x, w, None, t)
    torch.testing.assert_close(many[0], one[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(many[1], one[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    _check(x, w, None, t)


def test_noncontiguous_and_one_row():
    x = make((9, 16), seed=11, noncontig=True)
    w = make((30, 32), seed=12)[:, ::2]
    t = torch.randint(0, 30, (9,), generator=torch.Generator().manual_seed(13))
    _check(x, w, None, t)
    _check(make((1, 16), seed=14), make((30, 16), seed=15), None, torch.tensor([29]))


def test_gradcheck():
    x = make((4, 5), torch.float64, seed=16, requires_grad=True)
    w = make((6, 5), torch.float64, seed=17, requires_grad=True)
    b = make((6,), torch.float64, seed=18, requires_grad=True)
    t = torch.tensor([0, 5, -100, 2])
    for red in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: fusedformer.ops.linear_cross_entropy(x, w, t, b, reduction=red), (x, w, b))


def test_scaled_upstream_gradient_and_no_grad():
    x, w = make((6, 8), seed=19), make((11, 8), seed=20)
    t = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(21))
    xs = x.clone().requires_grad_()
    (fusedformer.ops.linear_cross_entropy(xs, w, t) * 3.5).backward()
    xr = x.clone().requires_grad_()
    (F.cross_entropy(F.linear(xr, w), t) * 3.5).backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        got = fusedformer.ops.linear_cross_entropy(x.requires_grad_(), w, t)
    assert not got.requires_grad
    torch.testing.assert_close(got, F.cross_entropy(F.linear(x, w), t), rtol=1e-6, atol=1e-6)


def test_all_rows_ignored():
    x, w = make((3, 4), seed=22), make((5, 4), seed=23)
    t = torch.full((3,), -100)
    assert torch.isnan(fusedformer.ops.linear_cross_entropy(x, w, t))  # as F.cross_entropy
    xs = x.clone().requires_grad_()
    loss = fusedformer.ops.linear_cross_entropy(xs, w, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(xs.grad, torch.zeros_like(x))


def test_nan_logits_propagate():
    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    loss, grad = _ops.cross_entropy_rows(logits, torch.tensor([0, 2]), torch.tensor(1.0), -100, True)
    assert torch.isnan(loss[0]) and torch.isnan(grad[0]).all()
    torch.testing.assert_close(loss[1], F.cross_entropy(logits[1:], torch.tensor([2]), reduction="sum"))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(t=torch.tensor([0, 9])), IndexError, "target 9 is out of range for 5 classes"),
        (dict(t=torch.tensor([0, -2])), IndexError, "target -2 is out of range"),
        (dict(t=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "target must be int64"),
        (dict(t=torch.tensor([0, 1, 2])), ValueError, "target must have input's leading shape"),
        (dict(w=torch.randn(5, 3)), ValueError, "weight must be \\(vocab, in_features\\)"),
        (dict(w=torch.randn(5, 4, dtype=torch.float64)), ValueError, "weight and bias must have input's dtype"),
        (dict(b=torch.randn(4)), ValueError, "bias must be \\(vocab,\\)"),
        (dict(reduction="none"), ValueError, "reduction must be 'mean' or 'sum'"),
    ],
)
def test_errors(kwargs, exc, match):
    a = dict(x=torch.randn(2, 4), w=torch.randn(5, 4), t=torch.tensor([0, 1]), b=None, reduction="mean")
    a.update(kwargs)
    with pytest.raises(exc, match=match):
        fusedformer.ops.linear_cross_entropy(a["x"], a["w"], a["t"], a["b"], reduction=a["reduction"])


def test_row_op_errors():
    with pytest.raises(ValueError, match="logits must be 2-D"):
        _ops.cross_entropy_rows(torch.randn(2, 3, 4), torch.tensor([0, 1]), torch.tensor(1.0), -100, False)
    with pytest.raises(ValueError, match="scale must be a one-element"):
        _ops.cross_entropy_rows(torch.randn(2, 3), torch.tensor([0, 1]), torch.ones(2), -100, False)
    with pytest.raises(IndexError, match="target 3 is out of range for 3 classes"):
        _ops.cross_entropy_rows(torch.randn(2, 3), torch.tensor([0, 3]), torch.tensor(1.0), -100, True)


def test_opcheck():
    logits = make((5, 33), seed=24)
    t = torch.tensor([0, 32, -100, 7, 1])
    for grad in (False, True):
        torch.library.opcheck(_ops.cross_entropy_rows.default, (logits, t, torch.tensor(0.25), -100, grad))


def test_gpt_loss_matches_logits_path():
    torch.manual_seed(0)
    model = fusedformer.models.GPT(vocab_size=97, n_positions=32, d_model=32, n_layer=2, n_head=4)
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    y[0, :3] = -100
    loss = model.loss(x, y)
    got = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(x)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    want = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_fullgraph():
    x, w = make((6, 8), seed=25), make((11, 8), seed=26)
    t = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(27))

    def f(x, w):
        return fusedformer.ops.linear_cross_entropy(x, w, t)

    xs = x.clone().requires_grad_()
    got = torch.compile(f, fullgraph=True)(xs, w)
    got.backward()
    xr = x.clone().requires_grad_()
    want = F.cross_entropy(F.linear(xr, w), t)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_autocast():
    """Under CPU autocast the head runs in bfloat16 and the loss in float32, as torch's composition."""
    x = make((8, 16), seed=28, requires_grad=True)
    w = make((50, 16), seed=29, requires_grad=True)
    t = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fusedformer.ops.linear_cross_entropy(x, w, t)
    gx, gw = torch.autograd.grad(got, [x, w])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(x, w), t)
    rx, rw = torch.autograd.grad(want, [x, w])
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gx, rx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-2)

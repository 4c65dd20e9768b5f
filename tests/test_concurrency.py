"""Thread safety and resource use: the ops called from 8 Python threads at once give the results of
one thread, bit for bit; 10,000 calls keep the process's memory flat; autograd graphs through the
ops are freed when their outputs are."""

import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

import fusedformer

THREADS = 8


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return {
        "x": r(6, 4, 33, 70),
        "mask": torch.rand(33, 70, generator=g) > 0.2,
        "h": r(5, 37, 96),
        "res": r(5, 37, 96),
        "w": r(96).float(),
        "b": r(96).float(),
        "q": r(2, 4, 45, 40),
        "k": r(2, 2, 53, 40),
        "v": r(2, 2, 53, 24),
    }


def _forward_backward(op, t):
    """One call of `op` on inputs `t` and its gradients (fresh leaves, so threads share nothing)."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in t.items()}
    x, h, res, w, b, q, k, v = (leaves[n] for n in ("x", "h", "res", "w", "b", "q", "k", "v"))
    if op == "softmax":
        outs, ins = [fusedformer.ops.softmax(x, mask=leaves["mask"], is_causal=True, scale=0.7)], [x]
    elif op == "layer_norm":
        outs, ins = list(fusedformer.ops.layer_norm(h, 96, w, b, residual=res)), [h, res, w, b]
    elif op == "rms_norm":
        outs, ins = [fusedformer.ops.rms_norm(h, 96, w)], [h, w]
    else:
        outs, ins = [fusedformer.ops.attention(q, k, v, is_causal=True, enable_gqa=True)], [q, k, v]
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(loss, ins)
    return [o.detach() for o in outs] + list(grads)


OPS = ["softmax", "layer_norm", "rms_norm", "attention"]


def _forward_only(op, t):
    if op == "softmax":
        return fusedformer.ops.softmax(t["x"], mask=t["mask"], is_causal=True, scale=0.7)
    if op == "layer_norm":
        return fusedformer.ops.layer_norm(t["h"], 96, t["w"], t["b"], residual=t["res"])
    if op == "rms_norm":
        return fusedformer.ops.rms_norm(t["h"], 96, t["w"])
    return fusedformer.ops.attention(t["q"], t["k"], t["v"], is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_match_one_thread(dtype):
    inputs = [_inputs(dtype, seed) for seed in range(THREADS)]
    expected = {(op, i): _forward_backward(op, inputs[i]) for op in OPS for i in range(THREADS)}

    def work(i):
        # every thread runs every op several times, interleaved with the others
        return [(op, i, _forward_backward(op, inputs[i])) for _ in range(3) for op in OPS]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for rs in pool.map(work, range(THREADS)) for r in rs]
    assert len(results) == THREADS * 3 * len(OPS)
    for op, i, got in results:
        for j, (a, b) in enumerate(zip(got, expected[(op, i)])):
            assert torch.equal(a, b), f"{op} thread {i} tensor {j}: differs from the one-thread result"


def _rss():
    gc.collect()
    return psutil.Process().memory_info().rss


def test_memory_flat_over_10000_calls():
    t = _inputs(torch.float32, 0)
    small = {k: (v[..., :8, :16] if v.dim() == 4 else v) for k, v in t.items()}
    small["mask"] = t["mask"][:8, :16]
    for op in OPS:  # warm up: caches, thread pools, allocator arenas
        for _ in range(300):
            _forward_backward(op, small)
    before = _rss()
    for n in range(10_000):  # every op 2,500 times; 4 calls in 10 with their backward
        op = OPS[n % len(OPS)]
        if n % 10 < 4:
            _forward_backward(op, small)
        else:
            _forward_only(op, small)
    after = _rss()
    growth = (after - before) / before
    assert growth < 0.05, f"RSS grew {100 * growth:.1f}% over 10,000 calls ({before >> 20} -> {after >> 20} MiB)"


@pytest.mark.parametrize("op", OPS)
def test_autograd_graph_freed(op):
    t = _inputs(torch.float32, 1)
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in t.items()}
    if op == "softmax":
        out = fusedformer.ops.softmax(leaves["x"], mask=leaves["mask"])
    elif op == "layer_norm":
        out = fusedformer.ops.layer_norm(leaves["h"], 96, leaves["w"], leaves["b"], residual=leaves["res"])[0]
    elif op == "rms_norm":
        out = fusedformer.ops.rms_norm(leaves["h"], 96, leaves["w"])
    else:
        out = fusedformer.ops.attention(leaves["q"], leaves["k"], leaves["v"], enable_gqa=True)
    out_ref = weakref.ref(out)
    node = out.grad_fn
    assert node is not None
    # the graph holds the inputs it saved; dropping the output (without backward) frees all of it
    leaf_refs = [weakref.ref(v) for v in leaves.values()]
    del out, node, leaves
    assert out_ref() is None, "output still referenced after del"
    assert all(r() is None for r in leaf_refs), "an input saved for backward outlives its graph"

    # after backward the saved tensors are released too, without the garbage collector
    gc.disable()
    try:
        x = t["h"].clone().requires_grad_(True)
        y = {
            "softmax": lambda: fusedformer.ops.softmax(x, is_causal=True),
            "layer_norm": lambda: fusedformer.ops.layer_norm(x, 96, residual=x)[0],
            "rms_norm": lambda: fusedformer.ops.rms_norm(x, 96),
            "attention": lambda: fusedformer.ops.attention(x, x, x),
        }[op]()
        y_ref, x_ref = weakref.ref(y), weakref.ref(x)
        y.sum().backward()
        del y, x
        assert y_ref() is None and x_ref() is None, "graph kept alive after backward"
    finally:
        gc.enable()

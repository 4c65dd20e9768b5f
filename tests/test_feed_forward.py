"""fusedformer.ops.feed_forward.relu_feed_forward (torch.nn's Transformer feed-forward with the ReLU
and its backward in place) against the autograd composition in float64: output, gradients, gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import fusedformer.nn.functional
from fusedformer.ops.feed_forward import relu_feed_forward


def test_importable_from_nn_functional():
    assert fusedformer.nn.functional.relu_feed_forward is relu_feed_forward


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["all", "input", "weights"])
def test_relu_feed_forward(bias, needs):
    """The fused ReLU feed-forward (ReLU and its backward in place) against the autograd composition
    in float64: output and the gradient of every argument that needs one; gradcheck."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 12, generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(20, 12, generator=g, dtype=torch.float64), torch.randn(12, 20, generator=g, dtype=torch.float64)
    b1 = torch.randn(20, generator=g, dtype=torch.float64) if bias else None
    b2 = torch.randn(12, generator=g, dtype=torch.float64) if bias else None
    args = [x, w1, b1, w2, b2]
    grad_of = {"all": range(5), "input": [0], "weights": [1, 2, 3, 4]}[needs]
    for i in grad_of:
        if args[i] is not None:
            args[i].requires_grad_()
    out = relu_feed_forward(*args)
    assert type(out.grad_fn).__name__ == "_ReluFeedForwardBackward"
    ref = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(out, ref)
    leaves = [t for t in args if t is not None and t.requires_grad]
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(relu_feed_forward, tuple(args))
    with torch.no_grad():  # the plain composition, ReLU in place
        torch.testing.assert_close(relu_feed_forward(*args), ref)

"""fusedformer.ops.feed_forward: the ReLU feed-forward ``linear(relu(linear(x, w1, b1)), w2, b2)``
(torch.nn's Transformer feed-forward with dropout 0) with the ReLU and its backward in place."""

from typing import Optional

import torch
from torch import Tensor

from .linear import linear, linear_backward


class _ReluFeedForward(torch.autograd.Function):
    """``linear(relu(linear(x, w1, b1)), w2, b2)`` with the ReLU in place on the fresh first
    projection and its backward in place on the fresh gradient of the second: autograd's ReLU would
    allocate a ``d_ff``-wide gradient of its own (a buffer of tens of MB whose pages are faulted in
    afresh on every step). Saves what autograd would (x, the activation, the weights)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        a = torch.relu_(linear(x, w1, b1))
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.save_for_backward(x, w1, a, w2)
        return linear(a, w2, b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w1, a, w2 = ctx.saved_tensors
        n = ctx.needs_input_grad
        need_a = n[0] or n[1] or n[2]
        ga, gw2, gb2 = linear_backward(grad, a, w2, (need_a, n[3], n[4] and ctx.has_bias[1]))
        gx = gw1 = gb1 = None
        if need_a:
            # ga is the op's fresh output: the ReLU's backward overwrites it
            ga = torch.ops.aten.threshold_backward.grad_input(ga, a, 0, grad_input=ga)
            gx, gw1, gb1 = linear_backward(ga, x, w1, (n[0], n[1], n[2] and ctx.has_bias[0]))
        return gx, gw1, gb1, gw2, gb2


def relu_feed_forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    """``linear(relu(linear(x, w1, b1)), w2, b2)`` (torch.nn's Transformer feed-forward with dropout
    0), with one ``d_ff``-wide buffer in the forward and one in the backward (autograd's ReLU needs
    two of each). Without autograd recording, or under autocast, it is the plain composition with
    the ReLU in place."""
    if torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type) and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)
    ):
        return _ReluFeedForward.apply(x, w1, b1, w2, b2)
    return linear(torch.relu_(linear(x, w1, b1)), w2, b2)

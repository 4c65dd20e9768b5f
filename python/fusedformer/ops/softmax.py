"""fusedformer.ops.softmax: softmax(x * scale + mask), with causal masking, in one pass."""

from typing import Optional

import torch

from ._checks import check_same_device, check_tensor, refuse_double_backward

_ops = torch.ops.fusedformer


def softmax(
    x: torch.Tensor,
    dim: int = -1,
    *,
    scale: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Softmax of ``x * scale`` along ``dim``.

    ``mask`` is bool (True = keep) or an additive floating tensor, broadcastable to ``x``;
    ``is_causal`` masks the last two dims (row i keeps columns j <= i). A row whose entries are all
    masked gives zeros (torch.softmax would give NaN); a NaN in a row makes the row NaN.
    An additive mask that requires grad receives its gradient.
    """
    check_tensor("fusedformer.softmax", "x", x)
    return _ops.softmax_fwd(x, dim, float(scale), mask, is_causal)


@torch.library.register_fake("fusedformer::softmax_fwd")
def _softmax_fwd_fake(x, dim, scale, mask, is_causal):
    check_same_device("fusedformer.softmax", "x", x, mask=mask)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fusedformer::softmax_bwd")
def _softmax_bwd_fake(grad_y, y, dim, scale):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, dim, scale, mask, is_causal = inputs
    ctx.dim = dim
    ctx.scale = scale
    ctx.mask_shape = mask.shape if mask is not None else None
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    grad_x = grad_mask = None
    if ctx.needs_input_grad[3]:
        # d/dmask = d/dz with z = x * scale + mask; d/dx = scale * d/dz
        grad_z = _ops.softmax_bwd(grad, y, ctx.dim, 1.0)
        grad_mask = grad_z.sum_to_size(ctx.mask_shape)
        if ctx.needs_input_grad[0]:
            grad_x = grad_z * ctx.scale
    elif ctx.needs_input_grad[0]:
        grad_x = _ops.softmax_bwd(grad, y, ctx.dim, ctx.scale)
    return grad_x, None, None, grad_mask, None


torch.library.register_autograd("fusedformer::softmax_fwd", _backward, setup_context=_setup_context)
refuse_double_backward("fusedformer::softmax_bwd")

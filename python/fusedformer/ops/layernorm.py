"""fusedformer.ops.layer_norm / rms_norm, with the fused residual (pre-norm) form."""

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._checks import check_same_device, check_tensor, refuse_double_backward

_ops = torch.ops.fusedformer

_Shape = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: _Shape) -> List[int]:
    if isinstance(normalized_shape, numbers.Integral):
        return [int(normalized_shape)]
    return [int(s) for s in normalized_shape]


def layer_norm(
    input: torch.Tensor,
    normalized_shape: _Shape,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """As ``torch.nn.functional.layer_norm``. With ``residual``, returns
    ``(layer_norm(input + residual), input + residual)`` computed in one pass."""
    check_tensor("fusedformer.layer_norm", "input", input)
    out, h, _, _ = _ops.layer_norm_fwd(input, _as_shape(normalized_shape), weight, bias, float(eps), residual)
    return (out, h) if residual is not None else out


def rms_norm(
    input: torch.Tensor,
    normalized_shape: _Shape,
    weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """As ``torch.nn.functional.rms_norm`` (``eps=None`` means ``torch.finfo(input.dtype).eps``).
    With ``residual``, returns ``(rms_norm(input + residual), input + residual)`` in one pass."""
    check_tensor("fusedformer.rms_norm", "input", input)
    if eps is None:
        eps = torch.finfo(input.dtype).eps if input.dtype.is_floating_point else 1e-6
    out, h, _ = _ops.rms_norm_fwd(input, _as_shape(normalized_shape), weight, float(eps), residual)
    return (out, h) if residual is not None else out


# ---------------------------------------------------------------------------------------------
# fake (shape) implementations


def _stats_shape(input, normalized_shape):
    return input.shape[: input.dim() - len(normalized_shape)]


def _compute_dtype(t):
    """The kernels' compute type: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fusedformer::layer_norm_fwd")
def _layer_norm_fwd_fake(input, normalized_shape, weight, bias, eps, residual):
    check_same_device("fusedformer.layer_norm", "input", input, weight=weight, bias=bias, residual=residual)
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    h = torch.empty_like(out) if residual is not None else input.new_empty((0,))
    stats = _stats_shape(input, normalized_shape)
    ct = _compute_dtype(input)
    return out, h, input.new_empty(stats, dtype=ct), input.new_empty(stats, dtype=ct)


@torch.library.register_fake("fusedformer::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_out, grad_residual_out, input, mean, rstd, weight, has_bias, normalized_shape):
    gx = torch.empty_like(input, memory_format=torch.contiguous_format)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else input.new_empty((0,))
    gb = input.new_empty(normalized_shape) if has_bias else input.new_empty((0,))
    return gx, gw, gb


@torch.library.register_fake("fusedformer::rms_norm_fwd")
def _rms_norm_fwd_fake(input, normalized_shape, weight, eps, residual):
    check_same_device("fusedformer.rms_norm", "input", input, weight=weight, residual=residual)
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    h = torch.empty_like(out) if residual is not None else input.new_empty((0,))
    return out, h, input.new_empty(_stats_shape(input, normalized_shape), dtype=_compute_dtype(input))


@torch.library.register_fake("fusedformer::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_out, grad_residual_out, input, rstd, weight, normalized_shape):
    gx = torch.empty_like(input, memory_format=torch.contiguous_format)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight is not None else input.new_empty((0,))
    return gx, gw


# ---------------------------------------------------------------------------------------------
# autograd


def _ln_setup(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps, residual = inputs
    out, h, mean, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if residual is not None else input, mean, rstd, weight)


def _ln_backward(ctx, g_out, g_h, g_mean, g_rstd):
    x, mean, rstd, weight = ctx.saved_tensors
    gx, gw, gb = _ops.layer_norm_bwd(
        g_out, g_h if ctx.has_residual else None, x, mean, rstd, weight, ctx.has_bias, ctx.normalized_shape
    )
    return (
        gx,
        None,
        gw if weight is not None else None,
        gb if ctx.has_bias else None,
        None,
        gx if ctx.has_residual else None,
    )


def _rms_setup(ctx, inputs, output):
    input, normalized_shape, weight, eps, residual = inputs
    out, h, rstd = output
    ctx.normalized_shape = normalized_shape
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if residual is not None else input, rstd, weight)


def _rms_backward(ctx, g_out, g_h, g_rstd):
    x, rstd, weight = ctx.saved_tensors
    gx, gw = _ops.rms_norm_bwd(g_out, g_h if ctx.has_residual else None, x, rstd, weight, ctx.normalized_shape)
    return gx, None, gw if weight is not None else None, None, gx if ctx.has_residual else None


torch.library.register_autograd("fusedformer::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)
torch.library.register_autograd("fusedformer::rms_norm_fwd", _rms_backward, setup_context=_rms_setup)
refuse_double_backward("fusedformer::layer_norm_bwd")
refuse_double_backward("fusedformer::rms_norm_bwd")

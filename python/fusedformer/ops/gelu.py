"""fusedformer.ops.gelu: the GELU activation, exact or with the tanh approximation, forward and
backward each in one pass over memory."""

import torch

from ._checks import check_same_device, check_tensor, refuse_double_backward

_ops = torch.ops.fusedformer

_APPROXIMATIONS = ("none", "tanh")


def _check_approximate(op: str, approximate) -> None:
    """The value check of the C++ ops, for the fake implementations (meta tensors, torch.compile)."""
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got '{approximate}'")


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """As ``torch.nn.functional.gelu``: ``input * Phi(input)`` with Phi the standard normal CDF
    (``approximate="none"``), or its tanh approximation (``approximate="tanh"``).

    float32, bfloat16 and float16 are computed in float32, float64 in float64. The result is
    contiguous, of the input's shape and dtype.
    """
    check_tensor("fusedformer.gelu", "input", input)
    if not isinstance(approximate, str):
        raise TypeError(f"fusedformer.gelu: approximate must be a str ('none' or 'tanh'), got {type(approximate).__name__}")
    return _ops.gelu(input, approximate)


def gelu_(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu`` in place: overwrites ``input`` (contiguous) and returns it, for a fresh activation no
    one else reads (inference: the output of a projection). No autograd: raises when ``input`` needs
    a gradient. The fused kernel runs on the CPU; on other devices this is ``input.copy_(gelu(input))``.
    """
    check_tensor("fusedformer.gelu_", "input", input)
    if not isinstance(approximate, str):
        raise TypeError(f"fusedformer.gelu_: approximate must be a str ('none' or 'tanh'), got {type(approximate).__name__}")
    if input.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("fusedformer.gelu_ has no backward: input requires grad; use fusedformer.gelu")
    if input.device.type != "cpu":
        return input.copy_(_ops.gelu(input, approximate))
    _ops.gelu_(input, approximate)
    return input


# ---------------------------------------------------------------------------------------------
# fake (shape) implementations


@torch.library.register_fake("fusedformer::gelu_")
def _gelu_inplace_fake(input, approximate):
    _check_approximate("fusedformer.gelu_", approximate)
    if not input.is_contiguous():
        raise ValueError(f"fusedformer.gelu_: input must be contiguous, got strides {tuple(input.stride())}")
    return None


@torch.library.register_fake("fusedformer::gelu")
def _gelu_fake(input, approximate):
    _check_approximate("fusedformer.gelu", approximate)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("fusedformer::gelu_bwd")
def _gelu_bwd_fake(grad, input, approximate):
    op = "fusedformer.gelu backward"
    _check_approximate(op, approximate)
    check_same_device(op, "input", input, grad=grad)
    if grad.dtype != input.dtype:
        raise TypeError(f"{op}: grad must have the dtype of input ({input.dtype}), got {grad.dtype}")
    if grad.shape != input.shape:
        raise ValueError(f"{op}: grad must have the input's shape {list(input.shape)}, got {list(grad.shape)}")
    return torch.empty_like(input, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output):
    input, approximate = inputs
    ctx.approximate = approximate
    ctx.save_for_backward(input)


def _backward(ctx, grad):
    (input,) = ctx.saved_tensors
    return _ops.gelu_bwd(grad, input, ctx.approximate), None


torch.library.register_autograd("fusedformer::gelu", _backward, setup_context=_setup_context)
refuse_double_backward("fusedformer::gelu_bwd")

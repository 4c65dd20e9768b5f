"""Checks the fake (meta) implementations share with the C++ ones.

A call that mixes meta tensors with real ones is dispatched to the fake implementation (the Meta
key outranks the others), so it must refuse the mix itself, as the C++ checks do for real tensors.
"""

from typing import Optional

import torch


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_tensor(op: str, name: str, t) -> None:
    """Non-tensor arguments are a TypeError naming the argument (the dispatcher's is a RuntimeError)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def refuse_double_backward(qualname: str) -> None:
    """The backward ops have no derivative of their own. Without an autograd registration a second
    derivative through them would silently come out as zero (PyTorch's fallback only warns); with
    this one it raises, naming the op."""

    def _backward(ctx, *grads):
        raise RuntimeError(
            f"{qualname}: double backward (a derivative of the gradient) is not supported by fusedformer's "
            "fused kernels; use the torch.nn.functional equivalent where second derivatives are needed"
        )

    torch.library.register_autograd(qualname, _backward, setup_context=lambda ctx, inputs, output: None)

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

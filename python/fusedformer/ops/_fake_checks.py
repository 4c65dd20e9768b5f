"""Checks the fake (shape) implementations make, so that tracing (torch.compile, meta tensors)
rejects what the device kernels reject, with the same message."""

import torch


def check_same_device(op: str, a: torch.Tensor, a_name: str, b, b_name: str) -> None:
    """b (a tensor or None) must be on a's device."""
    if b is None:
        return
    torch._check(
        b.device == a.device,
        lambda: f"{op}: {b_name} must be on the device of {a_name} ({a.device}), got {b.device}",
    )

"""Linear: ``torch.nn.Linear`` (same constructor, parameters and state_dict) on ``fusedformer.ops.linear``,
whose CPU kernels stream the weights once for inputs of few rows (one token per sequence in
generation) and run a blocked float32 product for many rows; see fusedformer.ops.linear."""

import torch
from torch import Tensor

from ..ops import linear


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` through ``fusedformer.ops.linear`` (which picks the kernel by rows and
    dtype). ``fused = False`` (an instance or class attribute) makes it plain ``F.linear``."""

    fused = True

    def forward(self, input: Tensor) -> Tensor:
        if not self.fused:
            return torch.nn.functional.linear(input, self.weight, self.bias)
        return linear(input, self.weight, self.bias)


def plain_linear(m: torch.nn.Module) -> bool:
    """Whether ``m`` is a ``torch.nn.Linear`` (not a subclass) without hooks: its call is ``F.linear``
    on its weight and bias, which fusedformer may compute another way."""
    return type(m) is torch.nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)


def call_linear(m: torch.nn.Module, x: Tensor) -> Tensor:
    """``m(x)`` for a projection module held by a torch.nn or HF module: a plain ``torch.nn.Linear``
    without hooks runs on ``fusedformer.ops.linear`` (the same function, faster kernels); anything
    else is called as it is."""
    if plain_linear(m):
        return linear(x, m.weight, m.bias)
    return m(x)

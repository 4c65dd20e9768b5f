"""Linear: ``torch.nn.Linear`` (same constructor, parameters and state_dict) on ``fusedformer.ops.linear``,
whose CPU kernel streams the weights once for inputs of few rows (one token per sequence in
generation) and hands larger inputs to ``torch.nn.functional.linear``."""

import torch
from torch import Tensor

from ..ops import linear


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` through ``fusedformer.ops.linear``: the fused kernel up to
    16 rows of input (every bfloat16 / float16 input on CPUs without bfloat16 matrix instructions),
    ``F.linear`` beyond. ``fused = False`` (an instance
    or class attribute) makes it plain ``F.linear``."""

    fused = True

    def forward(self, input: Tensor) -> Tensor:
        if not self.fused:
            return torch.nn.functional.linear(input, self.weight, self.bias)
        return linear(input, self.weight, self.bias)

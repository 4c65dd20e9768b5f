"""LayerNorm and RMSNorm: torch.nn's modules (same constructor, parameters and state_dict) computed by
the fused kernels, with an optional ``residual`` that adds the residual branch in the same pass."""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops import layer_norm, rms_norm
from .convert import twin_of


@twin_of(torch.nn.LayerNorm)
class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on the fused kernel.

    ``forward(input)`` is torch's. ``forward(input, residual)`` returns
    ``(layer_norm(input + residual), input + residual)`` computed in one pass over the data, which is
    the residual step of a Transformer block; the sum is what the next residual branch adds to.
    """

    _fusedformer_residual = True  # forward(input, residual) fuses the residual add (see nn.residual)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)


@twin_of(torch.nn.RMSNorm)
class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on the fused kernel (``eps=None`` means ``torch.finfo(input.dtype).eps``, as
    torch's). With ``residual``, returns ``(rms_norm(input + residual), input + residual)`` in one pass."""

    _fusedformer_residual = True

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual)

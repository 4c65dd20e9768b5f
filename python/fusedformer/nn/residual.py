"""The residual step of a Transformer block with the add fused into the norm, one convention for
every layer built here (the torch.nn twins, the HuggingFace twins and the models' blocks).

A norm module that fuses the residual add has ``_fusedformer_residual = True`` on its class and
``forward(input, residual)`` returning ``(norm(input + residual), input + residual)`` from one pass
(fusedformer.nn.LayerNorm / RMSNorm, the models' Norm, the Llama RMSNorm twin). For any other norm
module the helpers here do the add and the norm separately, so the layers need not ask.

- Pre-norm block: ``x = x + branch``, and the next sublayer reads ``norm(x)``:
  ``normed, x = pre_norm_add(norm, branch, x)``.
- Post-norm block: ``x = norm(x + branch)``: ``x = post_norm_add(norm, branch, x)``.
"""

from typing import Tuple

import torch
from torch import Tensor


def fuses_residual(norm: torch.nn.Module) -> bool:
    """Whether ``norm(x, residual)`` returns ``(norm(x + residual), x + residual)`` in one pass."""
    return getattr(type(norm), "_fusedformer_residual", False)


def pre_norm_add(norm: torch.nn.Module, branch: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
    """``(norm(residual + branch), residual + branch)``: the new residual stream and its norm, the
    input of the next sublayer; one fused pass where ``norm`` fuses the residual add."""
    if fuses_residual(norm):
        return norm(branch, residual)
    h = residual + branch
    return norm(h), h


def post_norm_add(norm: torch.nn.Module, branch: Tensor, residual: Tensor) -> Tensor:
    """``norm(residual + branch)``, when the sum itself is not needed. Fused in inference; with
    autograd recording, an add and a norm: autograd would materialize a zero gradient for the fused
    op's unused sum output, which costs more than the add it saves."""
    if torch.is_grad_enabled() and (branch.requires_grad or residual.requires_grad):
        return norm(residual + branch)
    return pre_norm_add(norm, branch, residual)[0]

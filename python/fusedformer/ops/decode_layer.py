"""fusedformer.ops.decode_layer: one pre-norm decoder block of the GPT models for one new token per
sequence (inference, CPU), its norms, projections (float or quantized), rotary embedding, KV cache
write, attention and MLP in one op.

Decoding one token runs some ten ops a block on a single row each, and at that size the Python and
dispatch around each op costs more than its kernel: about 115 us a block, against tens of us of
work in a small model. The op composes the same kernels in C++ (the results equal the module path's
to the bit); ``fusedformer.models.GPT`` uses it when decoding with a KV cache. The schema in
csrc/registration.cpp describes the arguments.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

_ops = torch.ops.fusedformer

# the activations of fusedformer.models.MLP the op takes
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
# rows up to which the exact GELU is the fused in-place kernel (beyond, ATen's; as the MLP module
# does, so that the op's results equal the module's); csrc/cpu/decode_layer.cpp holds the C++ copy
FUSED_GELU_ROWS = 16


def decode_layer(h: Tensor, delta: Optional[Tensor], params: Sequence[Optional[Tensor]], schemes: Sequence[str],
                 k_cache: Tensor, v_cache: Tensor, position: int, key_mask: Optional[Tensor] = None,
                 rope: Optional[Tuple[Tensor, Tensor]] = None, *, n_head: int, rms: bool, eps: float,
                 activation: str) -> Tuple[Tensor, Tensor]:
    """One block: ``h, delta = block(h, delta)`` of ``fusedformer.models.Block`` (pre-norm, fused
    residual) for ``h`` and ``delta`` (B, 1, D), writing the new key and value at ``position`` of
    ``k_cache`` / ``v_cache`` (B, Hkv, max_len, E) and attending to positions 0 .. position (keys
    masked by the bool ``key_mask`` (B, 1, 1, position + 1) when given). ``params``: the 16 tensors
    of csrc/registration.cpp's schema; ``schemes``: per projection, "" (float, on
    fusedformer.linear), "torch" (float, on torch.nn.functional.linear: the rows fusedformer.linear
    sends there) or its quantized_linear scheme; ``rope``: (cos, sin) (B, 1, 1, E) or None."""
    cos, sin = rope if rope is not None else (None, None)
    return _ops.decode_layer(h, delta, list(params), list(schemes), k_cache, v_cache, position, key_mask, cos, sin,
                             n_head, rms, eps, activation)


@torch.library.register_fake("fusedformer::decode_layer")
def _decode_layer_fake(h, delta, params, schemes, k_cache, v_cache, position, key_mask, rope_cos, rope_sin, n_head,
                       rms, eps, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"fusedformer.decode_layer: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return torch.empty_like(h), torch.empty_like(h)

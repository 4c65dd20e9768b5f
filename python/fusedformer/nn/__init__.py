"""fusedformer.nn: drop-in replacements for torch.nn's Linear, LayerNorm, RMSNorm, MultiheadAttention and
Transformer modules, computed by fusedformer's fused kernels.

Each class subclasses its torch.nn namesake: same constructor arguments and defaults, forward
signature, return values and state_dict keys (a torch.nn state_dict loads strictly, and back).
``fusedformer.patch(model)`` converts the torch.nn modules of an existing model in place.
"""

from .attention import MultiheadAttention
from .linear import Linear
from .layers import TransformerDecoderLayer, TransformerEncoderLayer
from .norm import LayerNorm, RMSNorm
from .transformer import Transformer, TransformerDecoder, TransformerEncoder

__all__ = [
    "Linear",
    "LayerNorm",
    "RMSNorm",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
]

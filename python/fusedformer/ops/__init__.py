"""Functional API: the fused ops with the argument names of their torch.nn.functional namesakes."""

from .attention import attention, attention_varlen
from .gelu import gelu, gelu_
from .cross_entropy import linear_cross_entropy
from .decode_layer import decode_layer
from .layernorm import layer_norm, rms_norm
from .linear import linear
from .paged_attention import paged_attention, paged_cache_write
from .quantized_linear import quantized_linear
from .softmax import softmax
from . import autocast as _autocast  # noqa: F401,E402  (kernels for the autocast dispatch keys)

__all__ = ["attention", "attention_varlen", "decode_layer", "gelu", "gelu_", "layer_norm", "linear", "linear_cross_entropy", "rms_norm", "softmax",
           "paged_attention", "paged_cache_write", "quantized_linear"]

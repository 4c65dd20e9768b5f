"""Functional API: the fused ops with the argument names of their torch.nn.functional namesakes."""

from .attention import attention
from .layernorm import layer_norm, rms_norm
from .linear import linear
from .softmax import softmax
from . import autocast as _autocast  # noqa: F401,E402  (kernels for the autocast dispatch keys)

__all__ = ["attention", "layer_norm", "linear", "rms_norm", "softmax"]

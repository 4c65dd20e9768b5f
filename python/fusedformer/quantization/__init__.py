"""Model optimization: quantization (``quantize``)."""

from .quantize import quantize

__all__ = ["quantize"]

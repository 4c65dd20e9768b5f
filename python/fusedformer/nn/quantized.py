"""QuantizedLinear: a linear layer whose weights are stored quantized (int8 per output channel, or
int4 / nf4 in groups) and multiplied by ``fusedformer.ops.quantized_linear``; for inference (made from a
trained ``torch.nn.Linear`` by :meth:`QuantizedLinear.from_linear` or ``fusedformer.quantize``)."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.quantized_linear import (GROUPED_SCHEMES, INT4_GROUP_SIZES, SCHEMES, dequantize_weight, quantize_weight,
                                    quantized_linear)


class QuantizedLinear(torch.nn.Module):
    """``y = x @ dequant(qweight).T + bias``. Buffers (saved in the state_dict): ``qweight`` (int8
    (out, in), or uint8 (out, in / 2) for int4 and nf4) and ``scale`` float32 ((out,), or (out, in /
    group_size)); ``bias`` a frozen parameter or None. The output has the input's dtype; the bias
    follows it."""

    # the MLP's fused ReLU path reads ``.weight`` of float layers; a quantized layer is called instead
    fused = False

    def __init__(self, in_features: int, out_features: int, scheme: str, *, group_size: Optional[int] = None,
                 bias: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"QuantizedLinear: scheme must be one of {SCHEMES}, got {scheme!r}")
        if scheme in GROUPED_SCHEMES:
            if group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"QuantizedLinear: group_size must be one of {INT4_GROUP_SIZES} for {scheme}, "
                                 f"got {group_size!r}")
            if in_features % group_size != 0:
                raise ValueError(f"QuantizedLinear: in_features ({in_features}) must be divisible by group_size "
                                 f"({group_size})")
            q = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
            s = torch.zeros(out_features, in_features // group_size, dtype=torch.float32, device=device)
        else:
            if group_size is not None:
                raise ValueError(f"QuantizedLinear: group_size applies to {' and '.join(GROUPED_SCHEMES)} only, "
                                 f"got {group_size} for {scheme!r}")
            q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            s = torch.zeros(out_features, dtype=torch.float32, device=device)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.bias = (torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: str, group_size: Optional[int] = None, *,
                    quantized: Optional[Tuple[Tensor, Tensor]] = None) -> "QuantizedLinear":
        """The quantized twin of ``linear`` (its weight quantized, its bias kept in its dtype);
        ``quantized``: its (qweight, scale) computed already (e.g. by calibrated rounding), in
        ``quantize_weight``'s format, instead of rounding to nearest."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, scheme, group_size=group_size,
                bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        q, s = quantized if quantized is not None else quantize_weight(w, scheme, group_size)
        if q.shape != m.qweight.shape or s.shape != m.scale.shape:
            raise ValueError(f"QuantizedLinear.from_linear: quantized weight {tuple(q.shape)} and scale "
                             f"{tuple(s.shape)}, expected {tuple(m.qweight.shape)} and {tuple(m.scale.shape)}")
        m.qweight.copy_(q)
        m.scale.copy_(s)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        return m

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts floating buffers; the scales stay float32 (the op's format), exact
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale = scale.to(self.scale.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (out, in) the layer stands for."""
        return dequantize_weight(self.qweight, self.scale, self.scheme, dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized float32 weight, for code that reads a projection's ``.weight`` rather than
        calling it (patched HF attention packs its q/k/v weights): it computes with the quantized
        values, at float speed."""
        return self.dequantized_weight(torch.float32 if self.bias is None else self.bias.dtype)

    def forward(self, input: Tensor) -> Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != input.dtype:
            bias = bias.to(input.dtype)
        return quantized_linear(input, self.qweight, self.scale, bias, self.scheme)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme!r}{g}, "
                f"bias={self.bias is not None}")

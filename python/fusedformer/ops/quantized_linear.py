"""fusedformer.ops.quantized_linear: ``input @ dequant(qweight).T + bias`` with quantized weights.

Formats (symmetric, no zero point; the schema in csrc/registration.cpp is the authority):

- ``"int8"``: ``qweight`` int8 (N, K), ``scale`` float32 (N,), one per output channel:
  ``W = qweight * scale[:, None]``, q in [-127, 127].
- ``"int4"``: ``qweight`` uint8 (N, K / 2), two values a byte; ``scale`` float32 (N, K / group_size),
  group_size a multiple of 32. In each block of 32 consecutive k, byte j of the block's 16 bytes holds
  element j in its low nibble and element j + 16 in its high nibble, stored as q + 8 (q in [-8, 7]),
  so that a SIMD register of bytes widens into two runs of consecutive elements.
- ``"int8_dynamic"``: the weights of ``"int8"``; each input row is quantized on the fly to int8
  (scale max|x| / 127) and the products are int8 x int8 summed exactly in int32 (AVX512-VNNI
  ``vpdpbusd`` where the CPU has it, AVX2 ``vpmaddubsw``), for prefill and encoders.

Weight-only schemes compute in float32 (float64 for float64 input). Few rows (generation) stream the
packed weights once against all rows; many rows dequantize panels of the weights into the blocked
float product. Inference only for the weights: the input gradient is ``grad @ dequant(W)``; asking for
a gradient of ``scale`` is an error.
"""

from typing import Optional, Tuple

import torch

from ._checks import check_same_device, check_tensor

_ops = torch.ops.fusedformer

SCHEMES = ("int8", "int4", "int8_dynamic")
# group sizes fusedformer.quantize offers for int4 (the op takes any multiple of 32)
INT4_GROUP_SIZES = (32, 64, 128)
_BLOCK = 32  # int4 values per packing block
# int4: the group's largest magnitude maps to -c, for the c of least squared error among these
_INT4_STEPS = (8.0, 7.5, 7.0, 6.5, 6.0, 5.5)


def quantized_linear(input: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, scheme: str = "int8") -> torch.Tensor:
    """``input @ dequant(qweight, scale, scheme).T + bias`` for ``input`` (..., K) of a float dtype,
    ``bias`` (N,) of input's dtype or None; the formats are in the module docstring. Returns
    (..., N) in input's dtype. Differentiable in ``input`` and ``bias``."""
    op = "fusedformer.quantized_linear"
    check_tensor(op, "input", input)
    check_tensor(op, "qweight", qweight)
    check_tensor(op, "scale", scale)
    return _ops.quantized_linear(input, qweight, scale, bias, scheme)


def quantize_weight(weight: torch.Tensor, scheme: str, group_size: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scale) of a float weight (N, K) in ``scheme``'s format. int8: scale = max|w| / 127
    per output channel, q = round(w / scale). int4: per group of ``group_size`` (a multiple of 32
    dividing K) the value of largest magnitude m maps to -c: scale = m / -c, q = clamp(round(w /
    scale), -8, 7), with c the one of least squared error in the group among 8, 7.5, ..., 5.5 (8: the
    full range; smaller: a finer step for the bulk, the extremes clipped)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_weight: scheme must be one of {SCHEMES}, got {scheme!r}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    N, K = w.shape
    if scheme != "int4":
        amax = w.abs().amax(dim=1)
        scale = amax / 127.0
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()
    if group_size is None or group_size % _BLOCK != 0 or group_size <= 0 or K % group_size != 0:
        raise ValueError(f"quantize_weight: group_size must be a positive multiple of {_BLOCK} dividing "
                         f"in_features ({K}), got {group_size}")
    g = w.reshape(N, K // group_size, group_size)
    idx = g.abs().argmax(dim=2, keepdim=True)
    m = torch.gather(g, 2, idx).squeeze(2)
    best_err = best_q = best_scale = None
    # the scale of least squared error among a few around m / -8 (a smaller step rounds the bulk of
    # the group finer at the cost of clipping its extremes)
    for c in _INT4_STEPS:
        scale = m / -c
        inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(g * inv[:, :, None]).clamp_(-8, 7)
        err = ((q * scale[:, :, None] - g) ** 2).sum(dim=2)
        if best_err is None:
            best_err, best_q, best_scale = err, q, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better[:, :, None], q, best_q)
            best_scale = torch.where(better, scale, best_scale)
    return pack_int4(best_q.to(torch.int16).reshape(N, K)), best_scale.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7] (any integer dtype) packed into uint8 (N, K / 2) in the op's layout."""
    N, K = q.shape
    u = (q.to(torch.int16) + 8).reshape(N, K // _BLOCK, 2, _BLOCK // 2)  # (N, blocks, half, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).to(torch.uint8).reshape(N, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int4 values (N, K) as int8 of ``packed`` uint8 (N, K / 2) in the op's layout."""
    N, H = packed.shape
    b = packed.to(torch.int16).reshape(N, H // (_BLOCK // 2), 1, _BLOCK // 2)
    u = torch.cat([b & 15, b >> 4], dim=2)  # (N, blocks, half, 16)
    return (u - 8).to(torch.int8).reshape(N, 2 * H)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, scheme: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (N, K) that (qweight, scale) stand for, in ``dtype``."""
    if scheme == "int4":
        q = unpack_int4(qweight).to(dtype)
        group = q.shape[1] // scale.shape[1]
        return q * scale.to(dtype).repeat_interleave(group, dim=1)
    return qweight.to(dtype) * scale.to(dtype)[:, None]


@torch.library.register_fake("fusedformer::quantized_linear")
def _quantized_linear_fake(input, qweight, scale, bias, scheme):
    op = "fusedformer.quantized_linear"
    check_same_device(op, "input", input, qweight=qweight, scale=scale, bias=bias)
    if scheme not in SCHEMES:
        raise ValueError(f"{op}: scheme must be \"int8\", \"int4\" or \"int8_dynamic\", got \"{scheme}\"")
    K = input.shape[-1] if input.dim() >= 1 else -1
    cols = 2 * qweight.shape[1] if scheme == "int4" and qweight.dim() == 2 else qweight.shape[-1]
    if qweight.dim() != 2 or input.dim() < 1 or cols != K:
        raise ValueError(f"{op}: the last dim of input {tuple(input.shape)} does not match qweight "
                         f"{tuple(qweight.shape)} for scheme \"{scheme}\"")
    return input.new_empty((*input.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    input, qweight, scale, bias, scheme = inputs
    ctx.scheme = scheme
    ctx.has_bias = bias is not None
    ctx.input_dtype = input.dtype
    ctx.save_for_backward(qweight, scale)


def _backward(ctx, grad):
    qweight, scale = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("fusedformer.quantized_linear: the quantized weights are for inference; no gradient "
                           "flows to scale (keep a float torch.nn.Linear to train the weights)")
    grad_input = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_weight(qweight, scale, ctx.scheme, grad.dtype)
        grad_input = grad @ w
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_input, None, None, grad_bias, None


torch.library.register_autograd("fusedformer::quantized_linear", _backward, setup_context=_setup_context)

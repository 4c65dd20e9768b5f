"""fusedformer.ops.quantized_linear: ``input @ dequant(qweight).T + bias`` with quantized weights.

Formats (symmetric, no zero point; the schema in csrc/registration.cpp is the authority):

- ``"int8"``: ``qweight`` int8 (N, K), ``scale`` float32 (N,), one per output channel:
  ``W = qweight * scale[:, None]``, q in [-127, 127].
- ``"int4"``: ``qweight`` uint8 (N, K / 2), two values a byte; ``scale`` float32 (N, K / group_size),
  group_size a multiple of 32. In each block of 32 consecutive k, byte j of the block's 16 bytes holds
  element j in its low nibble and element j + 16 in its high nibble, stored as q + 8 (q in [-8, 7]),
  so that a SIMD register of bytes widens into two runs of consecutive elements.
- ``"nf4"``: the layout and scales of ``"int4"``; the nibble c (q + 8) stands for ``NF4_LEVELS[c]``
  times the group's scale: 16 levels at the quantiles of a normal distribution (QLoRA's NormalFloat,
  the values bitsandbytes uses), finer near zero where most weights are. Same bytes and speed as int4
  (the kernels look a nibble's level up in a 16-entry table either way), lower error on trained weights.
- ``"int8_dynamic"``: the weights of ``"int8"``; each input row is quantized on the fly to int8
  (scale max|x| / 127) and the products are int8 x int8 summed exactly in int32 (AVX512-VNNI
  ``vpdpbusd`` where the CPU has it, AVX2 ``vpmaddubsw``), for prefill and encoders.
- ``"int4_dynamic"``: the weights of ``"int4"``; each input row is quantized on the fly to int8 in
  blocks of 32 features (a scale max|x| / 127 per block), and each block's products (4-bit code times
  int8) are summed exactly in int32 (``vpdpbusd``, AVX2 ``vpmaddubsw``), then scaled by the block's and
  the group's scales (llama.cpp's Q4_0 against Q8_0 activations). The 4-bit widening to float that
  bounds ``"int4"`` at few rows is gone: decoding reads the packed weights at memory speed.

Weight-only schemes compute in float32 (float64 for float64 input). Few rows (generation) stream the
packed weights once against all rows; many rows dequantize panels of the weights into the blocked
float product. Inference only for the weights: the input gradient is ``grad @ dequant(W)``; asking for
a gradient of ``scale`` is an error.
"""

from typing import Optional, Tuple

import torch

from ._checks import check_same_device, check_tensor

_ops = torch.ops.fusedformer

SCHEMES = ("int8", "int4", "nf4", "int8_dynamic", "int4_dynamic")
# the schemes of 4-bit codes in groups along the input features
GROUPED_SCHEMES = ("int4", "nf4", "int4_dynamic")
# group sizes fusedformer.quantize offers for the grouped schemes (the op takes any multiple of 32)
INT4_GROUP_SIZES = (32, 64, 128)
# nf4's levels, code c = q + 8 (ascending; csrc/include/fusedformer/quant_scheme.h holds the kernels' copy)
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
_BLOCK = 32  # int4 values per packing block
# int4: the candidate steps of a group's scale search: its largest magnitude m maps to -c for c in
# 6.5, 6.75, ..., 9.5 (c > 8 clips the extremes for a finer step), each rounding then refitted
_INT4_STEPS = tuple(6.5 + 0.25 * i for i in range(13))
# nf4: its largest magnitude m maps to 1 / c for c in 0.5, 0.55, ..., 1.5 (c < 1 clips the extremes;
# c > 1 leaves the outer levels unused on the side of m, which can fit the other side's weights better)
_NF4_STEPS = tuple(0.5 + 0.05 * i for i in range(21))
_INT4_SEARCH_CHUNK = 1 << 18  # weights searched at a time
_INT4_TINY = 2.0 ** -100  # groups whose largest magnitude is below quantize to zero (scale 0)


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
    per output channel, q = round(w / scale). int4 and nf4: per group of ``group_size`` (a multiple of
    32 dividing K) the scale of least squared error found by a search (``_group_search``), each weight
    then rounded to the nearest of the scheme's levels at that scale."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_weight: scheme must be one of {SCHEMES}, got {scheme!r}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    N, K = w.shape
    if scheme not in GROUPED_SCHEMES:
        scale, inv = int8_scales(w)
        q = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.contiguous(), scale.contiguous()
    if group_size is None or group_size % _BLOCK != 0 or group_size <= 0 or K % group_size != 0:
        raise ValueError(f"quantize_weight: group_size must be a positive multiple of {_BLOCK} dividing "
                         f"in_features ({K}), got {group_size}")
    groups = w.reshape(-1, group_size)
    q = torch.empty(groups.shape, dtype=torch.int16, device=w.device)
    scale = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, _INT4_SEARCH_CHUNK // group_size)  # groups at a time, to work in the cache
    for i in range(0, groups.shape[0], step):
        q[i:i + step], scale[i:i + step] = _group_search(groups[i:i + step], scheme)
    return pack_int4(q.reshape(N, K)), scale.reshape(N, K // group_size)


def int8_scales(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) per output channel of float32 weights (N, K): max|w| / 127, and 0 for a zero row."""
    amax = w.abs().amax(dim=1)
    return amax / 127.0, torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, and 0 where the scale is 0 (a group or channel of zeros, which rounds to code 0)."""
    return torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))


def round_to_levels(v: torch.Tensor, scheme: str, table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                    ) -> torch.Tensor:
    """The code q (float, in [-8, 7]) of the level of the 4-bit ``scheme`` nearest each value of ``v``
    (weights divided by their scale): int4 rounds half to even and clamps; nf4 takes the nearest of
    ``NF4_LEVELS`` (ties to the lower). Pass the result to :func:`level_values` for the values.
    ``table``: ``nf4_table(v.device)``, for callers that round many times (made here otherwise)."""
    if scheme != "nf4":  # int4's levels (int4, int4_dynamic)
        return torch.round(v).clamp_(-8, 7)
    _, midpoints = nf4_table(v.device) if table is None else table
    return torch.bucketize(v, midpoints).to(v.dtype).sub_(8)


def level_values(q: torch.Tensor, scheme: str, table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> torch.Tensor:
    """The values (before the group's scale) that codes ``q`` in [-8, 7] of the 4-bit ``scheme`` stand
    for; ``table`` as :func:`round_to_levels`'."""
    if scheme != "nf4":
        return q
    levels, _ = nf4_table(q.device) if table is None else table
    return levels[(q.long() + 8)].to(q.dtype)


def nf4_table(device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(``NF4_LEVELS`` as a float32 tensor, the midpoints between neighbouring levels), made at each
    call (so that they are fake tensors where the caller's are: the backward under tracing)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return levels, (levels[1:] + levels[:-1]) / 2


def _group_search(g: torch.Tensor, scheme: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int16, scale) of float32 groups g (n, group_size) in the 4-bit ``scheme``, all at once: for
    each candidate step (int4: ``_INT4_STEPS``, m a group's value of largest magnitude mapped to -c,
    the -8 end; nf4: ``_NF4_STEPS``, |m| mapped to 1 / c) the groups rounded to the nearest levels at
    that scale, then the scale of least squared error for those codes, <v, w> / <v, v> (v their
    levels); each group keeps the best over the steps and is rounded again to it (which cannot raise
    the error)."""
    m = torch.gather(g, 1, g.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    usable = m.abs() >= _INT4_TINY  # else q = 0, scale 0
    zero = torch.zeros_like(m)
    best_fit, best_scale = zero, zero
    if scheme != "nf4":
        multipliers = [torch.where(usable, -c / m, zero) for c in _INT4_STEPS]
    else:
        multipliers = [torch.where(usable, 1.0 / (c * m.abs()), zero) for c in _NF4_STEPS]
    vg = torch.empty_like(g)
    table = nf4_table(g.device) if scheme == "nf4" else None
    for r in multipliers:
        v = level_values(round_to_levels(g * r[:, None], scheme, table), scheme, table)
        qw = torch.mul(v, g, out=vg).sum(dim=1)
        vv = v.square_().sum(dim=1)
        # the squared error at the fitted scale is |w|^2 - <v, w>^2 / <v, v>: keep the largest fit
        # (<v, v> is 0 only where v is, and then <v, w> is too)
        fit = qw * qw / vv.clamp(min=1e-30)
        better = fit > best_fit
        best_fit = torch.where(better, fit, best_fit)
        best_scale = torch.where(better, qw / vv.clamp(min=1e-30), best_scale)
    q = round_to_levels(g * inverse_scale(best_scale)[:, None], scheme, table)
    return q.to(torch.int16), best_scale


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
    if scheme in GROUPED_SCHEMES:
        q = level_values(unpack_int4(qweight).to(torch.float32), scheme).to(dtype)
        group = q.shape[1] // scale.shape[1]
        return q * scale.to(dtype).repeat_interleave(group, dim=1)
    return qweight.to(dtype) * scale.to(dtype)[:, None]


@torch.library.register_fake("fusedformer::quantized_linear")
def _quantized_linear_fake(input, qweight, scale, bias, scheme):
    op = "fusedformer.quantized_linear"
    check_same_device(op, "input", input, qweight=qweight, scale=scale, bias=bias)
    if scheme not in SCHEMES:
        raise ValueError(f"{op}: scheme must be \"int8\", \"int4\", \"nf4\", \"int8_dynamic\" or \"int4_dynamic\", "
                         f"got \"{scheme}\"")
    K = input.shape[-1] if input.dim() >= 1 else -1
    cols = 2 * qweight.shape[1] if scheme in GROUPED_SCHEMES and qweight.dim() == 2 else qweight.shape[-1]
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

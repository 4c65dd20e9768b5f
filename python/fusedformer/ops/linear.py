"""fusedformer.ops.linear: ``input @ weight.T + bias`` (torch.nn.functional.linear), with CPU
kernels for few rows and, in float32, for many.

With few rows (generation: one new token per sequence) a linear layer is a stream over its weights,
and the general matrix product of the BLAS library reads them at a fraction of memory speed. The
``fusedformer::linear`` kernel reads each weight once, in place and in its own dtype, against all
the rows at once, up to ``SMALL_ROWS`` rows (``HALF_ROWS`` for bfloat16 / float16). From
``GEMM_ROWS`` rows on, float32 goes through the op's blocked matrix product (AVX2 / AVX-512 builds)
where the BLAS product is not tuned for the CPU (see ``BLAS_SGEMM_TUNED``); the backward uses it for
the input gradient. Other inputs go to ``torch.nn.functional.linear`` (bench/bench_linear.py
measures both).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _C
from ._checks import check_same_device, check_tensor

_ops = torch.ops.fusedformer

# Rows (the product of input's leading dims) up to which the fused kernel is used for float32 and
# float64 (beyond, the BLAS product is faster).
SMALL_ROWS = 16

# float32 rows from which the blocked product is used: with fewer, copying the weight into panels
# costs more than the product gains (32-64 rows: 0.3-0.5x F.linear), so F.linear takes them.
GEMM_ROWS = 512


def _cpu_info() -> Tuple[str, frozenset]:
    """The CPU's vendor and feature flags as Linux reports them (empty where it does not)."""
    vendor, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


_VENDOR, _FLAGS = _cpu_info()


# bfloat16 / float16 rows up to which the kernel is used (None: every input). On a CPU without
# matrix instructions for the type PyTorch's product widens the operands on every call and runs
# several times slower than the fused kernel at any size, so the kernel takes every input. With them
# (AVX512-BF16 / AMX-BF16; AVX512-FP16 / AMX-FP16), oneDNN's product is faster from 3 bfloat16 rows
# on (1-2 rows: the kernel at 1.2-1.6x) and somewhere between 8 and 64 float16 rows (8 rows: the
# kernel at 1.3x; 64: 0.4x).
HALF_ROWS = {
    torch.bfloat16: 2 if _FLAGS & {"avx512_bf16", "amx_bf16"} else None,
    torch.float16: SMALL_ROWS if _FLAGS & {"avx512_fp16", "amx_fp16"} else None,
}

# Whether torch's float32 product is MKL's on an Intel CPU, where its sgemm runs kernels tuned for
# the core and beats the blocked product (the product at 0.74-0.95x F.linear at 4096 rows on a Xeon
# with AVX-512); on other CPUs MKL takes a generic path that the blocked product beats (1.15-1.33x on
# an AMD EPYC with AVX2). Where it is, float32 above SMALL_ROWS rows goes to F.linear.
BLAS_SGEMM_TUNED = torch.backends.mkl.is_available() and _VENDOR == "GenuineIntel"

# Instruction sets whose build of the op has the float32 blocked product for many rows (the generic
# build has it too, for tests, but slower than the BLAS product).
_GEMM_ISAS = ("avx2", "avx512")
# Whether float32 from GEMM_ROWS rows on takes the blocked product: kept here, not asked of the
# extension on every call, so that torch.compile traces linear without a graph break
# (fusedformer.set_cpu_capability updates it).
_gemm = False
# Whether the blocked product can take bfloat16 products (the AVX-512 build on a CPU with
# AVX512-BF16) when torch's float32 matmul precision allows them (bf16_products).
_gemm_bf16 = False


def _capability_changed() -> None:
    global _gemm, _gemm_bf16
    _gemm = _C.cpu_capability() in _GEMM_ISAS and not BLAS_SGEMM_TUNED
    _gemm_bf16 = _gemm and _C.cpu_capability() == "avx512" and "avx512_bf16" in _FLAGS


def bf16_products() -> bool:
    """Whether float32 products from ``GEMM_ROWS`` rows on round their operands to bfloat16 and sum
    the products in float32 (vdpbf16ps: about twice the float32 rate; relative error about 2^-8 per
    operand): on an AVX-512 build on a CPU with AVX512-BF16 while torch's float32 matmul precision
    allows it, ``torch.set_float32_matmul_precision("medium")`` or
    ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, as torch's own CPU matmul then may."""
    return _gemm_bf16 and getattr(torch.backends.mkldnn.matmul, "fp32_precision", None) == "bf16"


_capability_changed()


def uses_kernel(input: torch.Tensor) -> bool:
    """Whether ``linear(input, ...)`` runs the op (rather than ``torch.nn.functional.linear``)."""
    if input.dim() == 0:
        return True  # the op raises the error
    # rows compared as elements (rows * in_features): no division, and right for in_features = 0
    in_features = input.shape[-1]
    if (input.device.type == "cpu" and input.dtype == torch.float32 and _gemm
            and input.numel() >= GEMM_ROWS * in_features):
        return True
    if input.dtype in HALF_ROWS and input.device.type == "cpu":
        limit = HALF_ROWS[input.dtype]
    else:
        limit = SMALL_ROWS
    return limit is None or input.numel() <= limit * in_features


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``input @ weight.T + bias`` for ``input`` (..., in_features), ``weight`` (out_features, in_features)
    and ``bias`` (out_features,) or None, all of one dtype. The op takes inputs of up to
    ``SMALL_ROWS`` rows (bfloat16 / float16: ``HALF_ROWS``) and float32 CPU inputs of ``GEMM_ROWS``
    rows or more on AVX2 / AVX-512 builds where the BLAS product is not tuned for the CPU;
    ``torch.nn.functional.linear`` the others. Differentiable in every argument."""
    check_tensor("fusedformer.linear", "input", input)
    check_tensor("fusedformer.linear", "weight", weight)
    if uses_kernel(input):
        return _ops.linear(input, weight, bias)
    return F.linear(input, weight, bias)


@torch.library.register_fake("fusedformer::linear")
def _linear_fake(input, weight, bias):
    check_same_device("fusedformer.linear", "input", input, weight=weight, bias=bias)
    if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"fusedformer.linear: the last dim of input {tuple(input.shape)} must equal in_features, "
                         f"weight.shape[1], of a 2-D weight {tuple(weight.shape)}")
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight)


def _weight_grad(grad2d: torch.Tensor, input2d: torch.Tensor) -> torch.Tensor:
    """``grad2d.T @ input2d``: the weight gradient, a product whose reduction runs over the rows.
    Where the forward takes the blocked product (float32, many rows, BLAS not tuned for the CPU) it
    takes it too, as ``linear(grad.T, input.T)`` read through the strides (1.0-1.3x ``torch.mm`` at
    4096 rows on GPT-2's and BERT's projections), and with ``bf16_products()`` from 128 x 384
    weights on (768 rows: 1.4-1.6x ``torch.mm`` at 384 x 128 to 128 x 512; at 128 x 128, 0.8x);
    otherwise torch's product."""
    if _gemm and grad2d.device.type == "cpu" and grad2d.dtype == torch.float32 == input2d.dtype:
        rows, out_f, in_f = grad2d.shape[0], grad2d.shape[1], input2d.shape[1]
        if min(rows, out_f) >= GEMM_ROWS or (
                rows >= GEMM_ROWS and min(out_f, in_f) >= 128 and out_f * in_f >= 128 * 384 and bf16_products()):
            return _ops.linear(grad2d.t(), input2d.t(), None)
    return grad2d.T @ input2d


def linear_backward(
    grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, needs: Tuple[bool, bool, bool]
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``linear(input, weight, bias)`` for the output gradient ``grad``: (input, weight,
    bias), each None where ``needs`` (the three flags, as ``ctx.needs_input_grad``) says so. The input
    gradient comes fresh from the op (the blocked product reads ``weight.T`` in place), so a caller
    may overwrite it."""
    grad_input = grad_weight = grad_bias = None
    if needs[0]:
        grad_input = linear(grad, weight.t())
    if needs[1] or needs[2]:
        g2 = grad.reshape(-1, grad.shape[-1])
        if needs[1]:
            grad_weight = _weight_grad(g2, input.reshape(-1, input.shape[-1]))
        if needs[2]:
            grad_bias = g2.sum(0)
    return grad_input, grad_weight, grad_bias


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    return linear_backward(grad, input, weight, needs)


torch.library.register_autograd("fusedformer::linear", _backward, setup_context=_setup_context)

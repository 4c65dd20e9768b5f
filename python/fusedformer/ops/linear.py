"""fusedformer.ops.linear: ``input @ weight.T + bias`` (torch.nn.functional.linear), with CPU
kernels for few rows and, in float32, for many.

With few rows (generation: one new token per sequence) a linear layer is a stream over its weights,
and the general matrix product of the BLAS library reads them at a fraction of memory speed. The
``fusedformer::linear`` kernel reads each weight once, in place and in its own dtype, against all
the rows at once, up to ``SMALL_ROWS`` rows. Above that, float32 goes through the op's blocked
matrix product (AVX2 / AVX-512 builds), which reads a transposed weight through its strides; the
backward uses it for the input gradient. Other inputs above ``SMALL_ROWS`` rows go to
``torch.nn.functional.linear`` (bench/bench_linear.py measures both).
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _C
from ._checks import check_same_device, check_tensor

_ops = torch.ops.fusedformer

# Rows (the product of input's leading dims) up to which the fused kernel is used for float32 and
# float64 (beyond, the BLAS product is faster).
SMALL_ROWS = 16


def _cpu_has_fast_half_gemm() -> bool:
    cpu = getattr(torch._C, "_cpu", None)
    return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


# bfloat16 / float16 on a CPU without bfloat16 matrix instructions (AVX512-BF16, AMX): PyTorch's product
# widens the operands on every call and runs several times slower than the fused kernel at any size,
# so the kernel takes every input there; elsewhere the float32 limit applies.
HALF_ROWS = SMALL_ROWS if _cpu_has_fast_half_gemm() else None


# Instruction sets whose build of the op has the float32 blocked product for many rows (the generic
# build has it too, for tests, but slower than the BLAS product).
_GEMM_ISAS = ("avx2", "avx512")
# Whether the instruction set in use is one of them: kept here, not asked of the extension on every
# call, so that torch.compile traces linear without a graph break (fusedformer.set_cpu_capability
# updates it).
_gemm = _C.cpu_capability() in _GEMM_ISAS


def _capability_changed() -> None:
    global _gemm
    _gemm = _C.cpu_capability() in _GEMM_ISAS


def _use_kernel(input: torch.Tensor) -> bool:
    if input.dim() == 0:
        return True  # the op raises the error
    if input.device.type == "cpu" and input.dtype == torch.float32 and _gemm:
        return True
    if input.dtype in (torch.bfloat16, torch.float16) and input.device.type == "cpu":
        limit = HALF_ROWS
    else:
        limit = SMALL_ROWS
    return limit is None or input.numel() <= limit * input.shape[-1]


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``input @ weight.T + bias`` for ``input`` (..., in_features), ``weight`` (out_features, in_features)
    and ``bias`` (out_features,) or None, all of one dtype. The op takes inputs of up to
    ``SMALL_ROWS`` rows, every float32 CPU input on AVX2 / AVX-512 builds and every bfloat16 / float16
    input on a CPU without bfloat16 matrix instructions (see ``HALF_ROWS``);
    ``torch.nn.functional.linear`` the others. Differentiable in every argument."""
    check_tensor("fusedformer.linear", "input", input)
    check_tensor("fusedformer.linear", "weight", weight)
    if _use_kernel(input):
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


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = linear(grad, weight.t())  # the blocked product reads weight.T in place
    if ctx.needs_input_grad[1]:
        grad_weight = grad.reshape(-1, grad.shape[-1]).T @ input.reshape(-1, input.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_input, grad_weight, grad_bias


torch.library.register_autograd("fusedformer::linear", _backward, setup_context=_setup_context)

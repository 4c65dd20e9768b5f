"""fusedformer: fused attention, layer/RMS norm and softmax kernels for PyTorch, as custom ops
(C++ on the CPU, CUDA on the GPU), with Transformer modules, models and generation built on them."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C
from . import ops
from .ops import attention, attention_varlen, gelu, layer_norm, linear, linear_cross_entropy, rms_norm, softmax
from .ops.linear import _capability_changed as _linear_capability_changed
from .patch import patch  # eager: a lazily imported submodule named patch would shadow the function

__version__ = "0.1.0"

# Submodules and names imported on first use (they pull in more of torch than the ops do).
_LAZY = {
    "nn": (".nn", None),
    "models": (".models", None),
    "reference": (".reference", None),
    "generate": (".generation", "generate"),
    "quantize": (".quantization", "quantize"),
    "prune": (".pruning", "prune"),
    "remove_masks": (".pruning", "remove_masks"),
    "sparsity": (".pruning", "sparsity"),
    "serving": (".serving", None),
    "LLM": (".serving", "LLM"),
    "SamplingParams": (".serving", "SamplingParams"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod_name, attr = _LAZY[name]
        mod = importlib.import_module(mod_name, __name__)
        value = getattr(mod, attr) if attr else mod
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fusedformer' has no attribute {name!r}")


def cpu_capability() -> str:
    """The instruction set the CPU kernels use now ("generic", "avx2" or "avx512")."""
    return _C.cpu_capability()


def available_cpu_capabilities() -> list:
    """Instruction sets this build has and this CPU supports, best last."""
    return _C.available_cpu_capabilities()


def set_cpu_capability(name: str) -> None:
    """Select the instruction set of the CPU kernels (for testing and benchmarking); the default is
    the best available, or the FUSEDFORMER_CPU_CAPABILITY environment variable."""
    _C.set_cpu_capability(name)
    _linear_capability_changed()


def built_with_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return _C.built_with_cuda()


__all__ = [
    "attention",
    "attention_varlen",
    "gelu",
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "rms_norm",
    "softmax",
    "patch",
    "ops",
    "cpu_capability",
    "available_cpu_capabilities",
    "set_cpu_capability",
    "built_with_cuda",
    "prune",
    "remove_masks",
    "sparsity",
]

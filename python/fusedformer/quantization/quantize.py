"""fusedformer.quantize: the linear layers of a model replaced, in place, by QuantizedLinear.

Schemes: ``"int8"`` (weights int8 per output channel, computed in the input's float dtype),
``"int4"`` (weights 4-bit in groups of ``group_size`` along the input features, each group's scale
the one of least squared error), ``"nf4"`` (int4's bytes, with 16 levels at normal quantiles rather
than evenly spaced: closer to trained weights at the same size and speed) and ``"int8_dynamic"`` (int8
weights; activations quantized per row on the fly, int8 products summed in int32: for prefill and
encoders) and ``"int4_dynamic"`` (int4's weights; activations quantized per block of 32 on the fly,
4-bit x int8 products summed in int32: int4's decoding at memory speed). The LM head (a top-level
``head`` / ``lm_head``, or any layer whose weight is an embedding's, as GPT's tied head) is quantized
too unless ``include_lm_head=False``: in decoding it is the largest single read (GPT-2's tied head is
a third of the model's weights), so a float head would hold quantized decoding at float speed. A
tied head gets its own packed copy; the embedding keeps its float table for the lookups.
"""

from typing import Iterable, Optional

import torch

from ..nn.linear import Linear
from ..nn.quantized import QuantizedLinear
from ..ops.quantized_linear import GROUPED_SCHEMES, INT4_GROUP_SIZES, SCHEMES
from .gptq import gptq_quantize, input_hessians

_HEAD_NAMES = ("head", "lm_head")


def _lm_heads(model: torch.nn.Module) -> set:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    heads = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (name in _HEAD_NAMES or id(m.weight) in embeddings):
            heads.add(name)
    return heads


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def quantize(model: torch.nn.Module, scheme: str, *, group_size: Optional[int] = None, skip: Iterable[str] = (),
             include_lm_head: bool = True, calibration: Optional[Iterable] = None,
             damping: float = 0.1) -> torch.nn.Module:
    """Replaces every ``torch.nn.Linear`` / ``fusedformer.nn.Linear`` of ``model`` (a fusedformer model,
    a ``fusedformer.nn`` model or a patched HF model) by a :class:`QuantizedLinear` of ``scheme``, in
    place, and returns ``model``. ``group_size``: 32, 64 or 128 for the 4-bit schemes (every quantized
    layer's in_features divisible by it), None otherwise. ``skip``: qualified module names (as
    ``named_modules`` gives them) left float, with their submodules. ``include_lm_head=False`` keeps
    the LM head float (see the module's docstring). ``calibration``: batches of inputs like the data
    the model will see (each a tensor, a dict of keyword arguments or a tuple of arguments for
    ``model``), run through the float model once to round every layer by GPTQ against its inputs
    (:mod:`fusedformer.quantization.gptq`; ``damping``: its diagonal damping, 0.1 holding up with a few
    hundred calibration tokens, 0.3 for fewer, 0.01 (GPTQ's) for many thousands) instead of to nearest.
    Everything is checked before the first layer is replaced, so that an error leaves the model as
    it was: a model already quantized, a bad scheme or group size, a skip name that names no module,
    a Linear subclass whose owner reads its weight itself (e.g. ``nn.MultiheadAttention.out_proj``)
    among the layers to replace, or calibration data that holds no batch or never calls a layer."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme in GROUPED_SCHEMES:
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantize: group_size must be one of {INT4_GROUP_SIZES} for \"{scheme}\", "
                             f"got {group_size!r}")
    elif group_size is not None:
        raise ValueError(f"quantize: group_size applies to \"int4\" and \"nf4\" only (int8 scales are per output "
                         f"channel), got {group_size} for {scheme!r}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    names = dict(model.named_modules())
    already = [n for n, m in names.items() if isinstance(m, QuantizedLinear)]
    if already:
        raise ValueError(f"quantize: the model is already quantized ({already[0]!r} is a QuantizedLinear); "
                         "quantize the float model")
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ValueError(f"quantize: skip names no module of the model: {unknown}")
    heads = set() if include_lm_head else _lm_heads(model)
    targets = []
    for name, m in names.items():
        if not isinstance(m, torch.nn.Linear) or _skipped(name, skip) or name in heads:
            continue
        if name == "":
            raise ValueError("quantize: model is itself a Linear, which cannot be replaced in place; use "
                             "fusedformer.nn.quantized.QuantizedLinear.from_linear")
        if type(m) not in (torch.nn.Linear, Linear):
            raise ValueError(f"quantize: unsupported layer {name!r} ({type(m).__module__}.{type(m).__qualname__}): "
                             "its owner may read the weight directly; pass it in skip to keep it float")
        if m._forward_hooks or m._forward_pre_hooks:
            raise ValueError(f"quantize: layer {name!r} has forward hooks, which a replacement would drop; "
                             "remove them or pass it in skip")
        if scheme in GROUPED_SCHEMES and m.in_features % group_size != 0:
            raise ValueError(f"quantize: layer {name!r} has in_features {m.in_features}, not divisible by "
                             f"group_size {group_size}; pick another group size or pass it in skip")
        targets.append(name)
    if not targets:
        raise ValueError("quantize: the model has no torch.nn.Linear layer to quantize")
    if not damping > 0:
        raise ValueError(f"quantize: damping must be positive, got {damping!r}")
    hessians = input_hessians(model, targets, calibration) if calibration is not None else {}
    replacements = {}
    for name in targets:
        quantized = gptq_quantize(names[name].weight, hessians[name], scheme, group_size, damping) if hessians else None
        replacements[name] = QuantizedLinear.from_linear(names[name], scheme, group_size, quantized=quantized)
    for name, q in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(names[parent_name] if parent_name else model, child, q)
    return model

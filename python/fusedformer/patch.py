"""fusedformer.patch(model): convert, in place, every module that has a fused twin.

Converted: torch.nn ``LayerNorm``, ``RMSNorm``, ``MultiheadAttention``, ``TransformerEncoderLayer``,
``TransformerDecoderLayer``, ``TransformerEncoder``, ``TransformerDecoder``, ``Transformer`` (to
fusedformer.nn), and the attention and norm modules of HuggingFace transformers' BERT (so also
sentence-transformers models built on it), GPT-2 and Llama. Other modules, including subclasses of
these types, are left alone.
"""

import collections
import dataclasses
from typing import Dict, List, Tuple

import torch


def _qualname(cls: type) -> str:
    """A short name: ``torch.nn.X`` / ``fusedformer.nn.X`` where the package exports it."""
    import fusedformer.nn

    for prefix, pkg in (("torch.nn", torch.nn), ("fusedformer.nn", fusedformer.nn)):
        if getattr(pkg, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class PatchSummary:
    """What one ``fusedformer.patch`` call converted: ``(module name, old class, new class)`` for each,
    and how many modules were fusedformer twins already (from an earlier patch or construction)."""

    replaced: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    already_fused: int = 0

    def counts(self) -> Dict[str, int]:
        """``"old class -> new class"``: number of modules."""
        return dict(collections.Counter(f"{old} -> {new}" for _, old, new in self.replaced))

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"fusedformer.patch: replaced {len(self.replaced)} module(s)"
                 + (f" ({self.already_fused} already fused)" if self.already_fused else "")]
        lines += [f"  {n:4d} x {k}" for k, n in self.counts().items()]
        return "\n".join(lines)


def _is_twin(cls: type) -> bool:
    return cls.__module__.startswith("fusedformer.nn")


def patch(model: torch.nn.Module, *, skip_padding: bool = True, verbose: bool = False) -> torch.nn.Module:
    """Swap, in place, every supported submodule of ``model`` (and ``model`` itself) for its fused twin
    with the same parameters, and return ``model``.

    A module is converted by changing its class to a subclass that only overrides ``forward``: the
    parameters stay the same objects (an optimizer built on them keeps working), the state_dict
    keys do not change, and ``isinstance`` checks against the original classes still hold. Patching
    twice is harmless (the second call converts nothing). The summary of the call is returned in
    ``model.fusedformer_summary`` (a :class:`PatchSummary`) and printed with ``verbose=True``.

    transformers modules are converted only for transformers 5.x; for a version or a module
    structure the twins do not know, a RuntimeError is raised before anything is converted.

    ``skip_padding`` (BERT encoders, inference only): drop padded tokens before the token-wise
    parts of the layers, so that padding costs only in attention. Outputs at real tokens are
    unchanged; at padded positions the encoder returns zeros (as torch.nn.TransformerEncoder's
    nested-tensor fast path does). With ``skip_padding=False`` padded positions are computed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fusedformer.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    from .nn.convert import twins

    table = twins()
    plan = []
    already = 0
    hf_cache: Dict[str, object] = {}
    for name, module in model.named_modules():
        cls = type(module)
        twin = table.get(cls)
        if twin is None and cls.__module__.startswith("transformers."):
            from .nn import hf

            twin = hf.twin_for(module, hf_cache)
        if twin is not None:
            plan.append((name, module, cls, twin))
        elif _is_twin(cls):
            already += 1
    summary = PatchSummary(already_fused=already)
    for name, module, cls, twin in plan:
        module.__class__ = twin
        summary.replaced.append((name or "<model>", _qualname(cls), _qualname(twin)))
    for module in model.modules():
        if _is_twin(type(module)) and hasattr(type(module), "skip_padding"):
            module.skip_padding = skip_padding
    model.fusedformer_summary = summary
    if verbose:
        print(summary)
    return model

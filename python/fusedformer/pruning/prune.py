"""fusedformer.prune: magnitude, N:M and structured pruning of a model's linear layers.

``"magnitude"`` and ``"n:m"`` (e.g. ``"2:4"``) mask weights (fusedformer.nn.masked), so the pruned
entries stay zero through fine-tuning; ``"structured"`` removes attention heads and feed-forward
neurons of a fusedformer GPT and shrinks its matrices (fusedformer.pruning.structured). The LM head
(a top-level ``head`` / ``lm_head``, or a layer sharing an embedding's weight) is never masked.
"""

import re
from typing import Iterable, Optional

import torch

from ..nn.masked import masked_layers, remove_masks, set_mask
from ..quantization.quantize import _lm_heads, _skipped
from . import structured
from .masks import magnitude_mask, nm_mask

METHODS = ("magnitude", "n:m", "structured")


def _targets(model, skip):
    """{name: layer} of the linear layers to mask, after checking ``skip``."""
    if isinstance(skip, str):
        skip = (skip,)
    names = dict(model.named_modules())
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ValueError(f"prune: skip names no module of the model: {unknown}")
    heads = _lm_heads(model)
    targets = {n: m for n, m in names.items()
               if isinstance(m, torch.nn.Linear) and n not in heads and not _skipped(n, skip)}
    if not targets:
        raise ValueError("prune: the model has no linear layer to prune (outside the LM head and skip)")
    return targets


def _nm(method, n, m):
    """(n, m) of an ``"n:m"`` method (``"2:4"``, or ``"n:m"`` with the n and m arguments)."""
    match = re.fullmatch(r"(\d+):(\d+)", method)
    if match:
        n, m = int(match[1]), int(match[2])
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"prune: an n:m pattern needs integers 0 < n < m, got n={n!r}, m={m!r}")
    return n, m


def prune(model: torch.nn.Module, method: str, *, amount: Optional[float] = None, n: int = 2, m: int = 4,
          heads: Optional[float] = None, ffn: Optional[float] = None, skip: Iterable[str] = (),
          importance: str = "magnitude", permanent: bool = False) -> torch.nn.Module:
    """Prunes ``model`` in place and returns it.

    - ``"magnitude"``: in every linear layer, the ``amount`` fraction (in (0, 1)) of weights of smallest
      |w| masked to zero.
    - ``"n:m"`` with ``n``, ``m``, or ``"2:4"`` directly: in every group of ``m`` consecutive weights
      along the input features the ``n`` largest |w| kept (each layer's in_features a multiple of m).
    - ``"structured"`` (a fusedformer GPT): the ``heads`` fraction of attention heads and/or the ``ffn``
      fraction of feed-forward neurons of every layer removed by ``importance`` and the matrices
      shrunk; the config records the new ``n_head`` / ``d_ff``.

    Masks persist through training (the forward, gradient and optimizer steps see the zeros) and
    checkpoints; ``permanent=True``, or ``fusedformer.remove_masks(model)`` later, bakes them into
    plain weights. ``skip``: qualified module names left dense, with their submodules. Every argument is
    checked before anything changes, so that an error leaves the model as it was."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prune: model must be a torch.nn.Module, got {type(model).__qualname__}")
    if not isinstance(method, str) or (method not in METHODS and not re.fullmatch(r"\d+:\d+", method)):
        raise ValueError(f"prune: method must be one of {METHODS} or an n:m pattern such as \"2:4\", got {method!r}")
    if method == "structured":
        if amount is not None:
            raise ValueError("prune: amount applies to \"magnitude\"; structured pruning takes heads and ffn")
        structured.shrink(model, structured.plan(model, heads, ffn, importance))
        return model
    if heads is not None or ffn is not None:
        raise ValueError(f"prune: heads and ffn apply to \"structured\", not {method!r}")
    targets = _targets(model, tuple(skip))
    if method == "magnitude":
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 < amount < 1:
            raise ValueError(f"prune: amount must be a fraction in (0, 1), got {amount!r}")
        masks = {name: magnitude_mask(layer.weight, amount) for name, layer in targets.items()}
    else:
        if amount is not None:
            raise ValueError("prune: amount applies to \"magnitude\"; an n:m pattern fixes the sparsity")
        n, m = _nm(method, n, m)
        bad = [f"{name!r} (in_features {layer.in_features})" for name, layer in targets.items()
               if layer.in_features % m]
        if bad:
            raise ValueError(f"prune: {n}:{m} needs in_features divisible by {m}; not so for {', '.join(bad)}; "
                             "pass them in skip")
        masks = {name: nm_mask(layer.weight, n, m) for name, layer in targets.items()}
    for name, mask in masks.items():
        set_mask(targets[name], mask)
    if permanent:
        remove_masks(model)
    return model


def sparsity(model: torch.nn.Module) -> dict:
    """{name: fraction of zero weights} of every linear layer (masked or not), and ``"total"`` over them."""
    report, zeros, total = {}, 0, 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear):
                w = layer.weight
                z = int((w == 0).sum())
                report[name] = z / w.numel()
                zeros, total = zeros + z, total + w.numel()
    report["total"] = zeros / total if total else 0.0
    return report


__all__ = ["prune", "remove_masks", "sparsity", "masked_layers"]

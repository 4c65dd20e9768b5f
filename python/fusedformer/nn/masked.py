"""Weight masks that survive training: a layer's ``weight`` becomes ``original * mask`` through
``torch.nn.utils.parametrize``, so its forward (``fusedformer.ops.linear`` or ``F.linear``), its
gradient and every optimizer step see the pruned entries as zeros, whatever the optimizer does to
the stored ``original``. fusedformer.prune sets the masks; checkpoints store the masked weight
under its plain name and list the masked layers, whose masks come back as the weight's nonzeros."""

import torch
from torch.nn.utils import parametrize


class WeightMask(torch.nn.Module):
    """The parametrization ``weight = original * mask``; ``mask`` (bool, the weight's shape) is a buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def weight_mask(layer: torch.nn.Module):
    """The layer's WeightMask, or None when its weight is not masked."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    return next((p for p in layer.parametrizations.weight if isinstance(p, WeightMask)), None)


def set_mask(layer: torch.nn.Module, mask: torch.Tensor) -> None:
    """Mask ``layer.weight`` by ``mask`` (True = keep): a new parametrization, or the layer's mask replaced.
    The stored weight is zeroed where masked too, so that removing the mask keeps the zeros."""
    mask = mask.to(device=layer.weight.device, dtype=torch.bool)
    existing = weight_mask(layer)
    if existing is not None:
        existing.mask.copy_(mask)
        original = layer.parametrizations.weight.original
    else:
        parametrize.register_parametrization(layer, "weight", WeightMask(mask))
        original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.mul_(mask)


def masked_layers(model: torch.nn.Module) -> dict:
    """{qualified name: layer} of the layers whose weight is masked."""
    return {n: m for n, m in model.named_modules() if weight_mask(m) is not None}


def remove_masks(model: torch.nn.Module) -> torch.nn.Module:
    """Bake every mask into its weight (a plain Parameter again, pruned entries zero) and return ``model``."""
    for m in masked_layers(model).values():
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def plain_state_dict(model: torch.nn.Module) -> dict:
    """``model.state_dict()`` with each masked layer's ``parametrizations.weight.*`` entries replaced by its
    masked weight under ``<layer>.weight``: the layout of the unmasked model."""
    state = model.state_dict()
    for name, m in masked_layers(model).items():
        prefix = f"{name}.parametrizations.weight." if name else "parametrizations.weight."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state[f"{name}.weight" if name else "weight"] = m.weight.detach()
    return state


def restore_masks(model: torch.nn.Module, names, source: str) -> None:
    """Mask the layers ``names`` (a checkpoint's list) by their loaded weights' nonzeros."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules.get(name)
        if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise ValueError(f"{source}: the masked layer {name!r} is not a layer of the model")
        set_mask(m, m.weight.detach() != 0)

"""Unstructured masks of a weight (True = keep): magnitude (the smallest-|w| fraction removed) and
N:M (the n largest |w| kept in every group of m consecutive weights along the input features)."""

import torch


def magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Removes exactly ``round(amount * weight.numel())`` entries, those of smallest |w| (ties broken
    by position)."""
    k = round(amount * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:k]] = False
    return mask.view_as(weight)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the ``n`` largest |w| of each group of ``m`` consecutive weights of a row; the caller checks
    that the row length (in_features) is a multiple of ``m``."""
    out_f, in_f = weight.shape
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(out_f, in_f)

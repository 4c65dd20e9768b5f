"""Attention masks: from torch.nn's conventions to the one of the fused kernels, once per forward.

torch.nn.MultiheadAttention takes ``attn_mask`` (``(L, S)`` or ``(N * num_heads, L, S)``; bool with
True = *masked out*, or an additive float mask) and ``key_padding_mask`` (``(N, S)``; bool with True =
*padding*, or additive float). ``fusedformer.attention`` takes one mask broadcastable to
``(N, H, L, S)``: bool with True = *keep*, or additive float, plus ``is_causal``.

:func:`merge_masks` builds that one mask. A 2-D ``attn_mask`` stays ``(1, 1, L, S)`` and a padding
mask ``(N, 1, 1, S)``: neither is expanded over heads. Only when both are given is a combined
``(N, 1, L, S)`` mask formed (``(N, H, L, S)`` when ``attn_mask`` is per head already).
"""

from typing import Optional

import torch
from torch import Tensor


def _check_mask_dtype(mask: Tensor, name: str) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")


def _as_4d_attn_mask(attn_mask: Tensor, batch: int, heads: int, L: int, S: int, batched: bool) -> Tensor:
    """(L, S) -> (1, 1, L, S); (N * H, L, S) (or (H, L, S) unbatched) -> (N, H, L, S); views only."""
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (L, S):
            raise ValueError(f"attn_mask: a 2-D mask must have shape (L, S) = {(L, S)}, got {tuple(attn_mask.shape)}")
        return attn_mask.view(1, 1, L, S)
    if attn_mask.dim() == 3:
        want = (batch * heads if batched else heads, L, S)
        if tuple(attn_mask.shape) != want:
            what = "(N * num_heads, L, S)" if batched else "(num_heads, L, S)"
            raise ValueError(f"attn_mask: a 3-D mask must have shape {what} = {want}, got {tuple(attn_mask.shape)}")
        return attn_mask.view(batch, heads, L, S)
    raise ValueError(f"attn_mask must have 2 or 3 dimensions, got {attn_mask.dim()} (shape {tuple(attn_mask.shape)})")


def _as_4d_padding_mask(key_padding_mask: Tensor, batch: int, S: int, batched: bool) -> Tensor:
    want = (batch, S) if batched else (S,)
    if tuple(key_padding_mask.shape) != want:
        what = "(N, S)" if batched else "(S,)"
        raise ValueError(f"key_padding_mask must have shape {what} = {want}, got {tuple(key_padding_mask.shape)}")
    return key_padding_mask.view(batch, 1, 1, S)


def merge_masks(
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    *,
    batch: int,
    heads: int,
    L: int,
    S: int,
    batched: bool = True,
) -> Optional[Tensor]:
    """torch.nn's ``attn_mask`` and ``key_padding_mask`` as one fused-kernel mask (bool True = keep,
    or additive float), broadcastable to ``(batch, heads, L, S)``; None when neither is given.

    Float masks are used as they are (the kernel adds them); a bool mask is inverted. When both are
    given, bool/bool gives ``keep = ~attn & ~pad`` and any float side gives an additive mask with
    ``-inf`` where the bool side masks, or the sum of the two float masks (torch.nn adds them too).
    """
    am = pm = None
    if attn_mask is not None:
        _check_mask_dtype(attn_mask, "attn_mask")
        am = _as_4d_attn_mask(attn_mask, batch, heads, L, S, batched)
    if key_padding_mask is not None:
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        pm = _as_4d_padding_mask(key_padding_mask, batch, S, batched)
    if pm is None:
        return None if am is None else (am.logical_not() if am.dtype == torch.bool else am)
    if am is None:
        return pm.logical_not() if pm.dtype == torch.bool else pm
    if am.dtype == torch.bool and pm.dtype == torch.bool:
        return torch.logical_not(am | pm)
    if am.dtype == torch.bool:
        return pm.masked_fill(am, float("-inf"))
    if pm.dtype == torch.bool:
        return am.masked_fill(pm, float("-inf"))
    return am + pm


def pad_keep_columns(mask: Optional[Tensor], n: int) -> Optional[Tensor]:
    """Append ``n`` key columns that every query keeps (for ``add_bias_kv`` / ``add_zero_attn``)."""
    if mask is None or n == 0:
        return mask
    return torch.nn.functional.pad(mask, (0, n), value=True if mask.dtype == torch.bool else 0.0)


def generate_square_subsequent_mask(
    sz: int, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
) -> Tensor:
    """The float causal mask of torch.nn.Transformer: ``-inf`` above the diagonal, 0 elsewhere."""
    return torch.triu(torch.full((sz, sz), float("-inf"), dtype=dtype, device=device), diagonal=1)


def is_causal_mask(mask: Optional[Tensor], size: Optional[int]) -> bool:
    """Whether ``mask`` is exactly the square causal mask of ``size`` (torch.nn's convention: bool
    True above the diagonal, or float ``-inf`` above and 0 on and below it)."""
    if mask is None or mask.dim() != 2:
        return False
    sz = size if size is not None else mask.size(-2)
    if tuple(mask.shape) != (sz, sz):
        return False
    return bool((mask == generate_square_subsequent_mask(sz, device=mask.device, dtype=mask.dtype)).all())


def detect_is_causal(mask: Optional[Tensor], is_causal: Optional[bool], size: Optional[int]) -> bool:
    """torch.nn.TransformerEncoder/Decoder's rule: an explicit ``is_causal`` wins; with None, the mask
    is checked against the causal mask of ``size``."""
    if is_causal is not None:
        return bool(is_causal)
    return is_causal_mask(mask, size)


def seq_len(x: Tensor, batch_first: bool) -> int:
    """The sequence length of a ``(L, E)``, ``(N, L, E)`` (batch_first) or ``(L, N, E)`` input."""
    if x.dim() == 2:
        return x.size(0)
    return x.size(1 if batch_first else 0)

"""Multi-head attention as functions over already-merged masks: projections, the attention core and
the output projection, with no copies beyond the ones the layouts require.

The query/key/value projections are views into one packed projection (self-attention) or two
(cross-attention with ``key is value``); their heads are split by views with strides that the fused
kernel reads directly, so no ``contiguous()`` copy is made before the kernel. The one copy on the
way out is the ``(N, H, L, E) -> (N, L, H * E)`` transpose that the output projection needs.

A packed projection whose output would exceed ``MAX_BLOCK_BYTES`` (see fusedformer.ops._blocks:
a larger buffer is faulted in afresh on every call) is computed as separate projections.

``relu_feed_forward`` (torch.nn's Transformer feed-forward with the ReLU in place) lives with the
ops, in fusedformer.ops.feed_forward, and is importable from here as well.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import attention, linear, softmax
from ..ops._blocks import fits
from ..ops.feed_forward import relu_feed_forward

__all__ = ["split_heads", "merge_heads", "in_projection", "append_kv", "uses_explicit_path", "attention_core",
           "multi_head_attention", "relu_feed_forward"]


def split_heads(x: Tensor, num_heads: int, batch_first: bool) -> Tensor:
    """``(N, L, H * E)`` (batch_first) or ``(L, N, H * E)`` -> a ``(N, H, L, E)`` view."""
    x = x.unflatten(-1, (num_heads, -1))
    return x.transpose(1, 2) if batch_first else x.permute(1, 2, 0, 3)


def merge_heads(x: Tensor, batch_first: bool) -> Tensor:
    """``(N, H, L, E)`` -> ``(N, L, H * E)`` (batch_first) or ``(L, N, H * E)``: one copy."""
    if batch_first:
        return x.transpose(1, 2).flatten(2)
    return x.permute(2, 0, 1, 3).flatten(2)


def in_projection(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The q, k, v projections (torch.nn.MultiheadAttention's weights), as few matmuls as the
    arguments allow: one for self-attention, two when ``key is value`` (unless the packed output
    would exceed ``MAX_BLOCK_BYTES``)."""
    if in_proj_weight is not None:
        d = in_proj_weight.size(0) // 3
        tokens = query.numel() // max(1, query.size(-1))
        if query is key and key is value and fits(tokens, 3 * d, query.dtype):
            return linear(query, in_proj_weight, in_proj_bias).split(d, dim=-1)
        w_q, w_kv = in_proj_weight.split((d, 2 * d))
        b_q, b_kv = in_proj_bias.split((d, 2 * d)) if in_proj_bias is not None else (None, None)
        q = linear(query, w_q, b_q)
        if key is value and fits(key.numel() // max(1, key.size(-1)), 2 * d, key.dtype):
            k, v = linear(key, w_kv, b_kv).split(d, dim=-1)
            return q, k, v
        w_k, w_v = w_kv.chunk(2)
        b_k, b_v = b_kv.chunk(2) if b_kv is not None else (None, None)
        return q, linear(key, w_k, b_k), linear(value, w_v, b_v)
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    return linear(query, q_proj_weight, b_q), linear(key, k_proj_weight, b_k), linear(value, v_proj_weight, b_v)


def append_kv(
    k: Tensor, v: Tensor, bias_k: Optional[Tensor], bias_v: Optional[Tensor], add_zero_attn: bool, batch_first: bool
) -> Tuple[Tensor, Tensor]:
    """torch.nn.MultiheadAttention's ``add_bias_kv`` (a learned key/value appended to the sequence)
    and ``add_zero_attn`` (a zero key/value appended after it), on projected ``(N, S, D)`` /
    ``(S, N, D)`` keys and values."""
    seq_dim = 1 if batch_first else 0
    n = k.size(0 if batch_first else 1)
    shape = (n, 1, -1) if batch_first else (1, n, -1)
    if bias_k is not None:
        k = torch.cat([k, bias_k.reshape(1, 1, -1).expand(shape)], dim=seq_dim)
        v = torch.cat([v, bias_v.reshape(1, 1, -1).expand(shape)], dim=seq_dim)
    if add_zero_attn:
        zshape = list(k.shape)
        zshape[seq_dim] = 1
        k = torch.cat([k, k.new_zeros(zshape)], dim=seq_dim)
        zshape[-1] = v.size(-1)
        v = torch.cat([v, v.new_zeros(zshape)], dim=seq_dim)
    return k, v


def uses_explicit_path(q: Tensor, mask: Optional[Tensor], need_weights: bool) -> bool:
    """The attention probabilities are formed explicitly (O(L * S) memory per head) when they are
    returned, when an additive mask needs its gradient, and for float64 (which the fused CPU
    kernel does not take)."""
    mask_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()
    return need_weights or mask_grad or q.dtype == torch.float64


def attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    is_causal: bool,
    dropout_p: float,
    need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Attention over ``(N, H, L, E)`` views; returns the ``(N, H, L, E)`` output and, with
    ``need_weights``, the ``(N, H, L, S)`` probabilities (after dropout, as torch.nn returns them)."""
    if not uses_explicit_path(q, mask, need_weights):
        return attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal), None
    scores = torch.matmul(q, k.transpose(-2, -1))
    p = softmax(scores, -1, scale=1.0 / math.sqrt(q.size(-1)), mask=mask, is_causal=is_causal)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, v), (p if need_weights else None)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    *,
    mask: Optional[Tensor] = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    average_attn_weights: bool = True,
    batch_first: bool = True,
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
    bias_k: Optional[Tensor] = None,
    bias_v: Optional[Tensor] = None,
    add_zero_attn: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Batched multi-head attention with torch.nn.MultiheadAttention's weights and a mask already in
    the fused convention (see :func:`fusedformer.nn.masks.merge_masks`), whose key columns include
    the ones ``bias_k`` / ``add_zero_attn`` append. ``dropout_p`` is applied as given (pass 0 in
    eval mode)."""
    q, k, v = in_projection(query, key, value, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight, v_proj_weight)
    if bias_k is not None or add_zero_attn:
        k, v = append_kv(k, v, bias_k, bias_v, add_zero_attn, batch_first)
    q, k, v = (split_heads(t, num_heads, batch_first) for t in (q, k, v))
    out, weights = attention_core(q, k, v, mask, is_causal, dropout_p, need_weights)
    out = linear(merge_heads(out, batch_first), out_proj_weight, out_proj_bias)
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    return out, weights

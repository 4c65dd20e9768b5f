"""fusedformer.ops.attention: scaled dot-product attention, tiled with an online softmax."""

import math
from typing import Optional

import torch

from ._checks import check_same_device, refuse_double_backward

_ops = torch.ops.fusedformer


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """As ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes ``(..., H, L, E)`` for the query and ``(..., Hkv, S, E)`` / ``(..., Hkv, S, Ev)`` for key
    and value; with ``enable_gqa``, ``H`` may be a multiple of ``Hkv``. ``attn_mask`` is bool
    (True = keep) or additive, broadcastable to ``(..., H, L, S)``; ``is_causal`` keeps key j for
    query i when j <= i (top-left aligned, as PyTorch's). Both may be given together. Head dims up to
    256. Extra memory is O(L) per head: the L x S score matrix is never formed. A query whose keys
    are all masked gets zeros (and zero gradients). An additive mask receives no gradient.
    """
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
        raise TypeError("fusedformer.attention: query, key and value must be tensors")
    if query.dim() >= 3 and key.dim() >= 3 and query.size(-3) != key.size(-3) and not enable_gqa:
        raise ValueError(
            f"fusedformer.attention: query has {query.size(-3)} heads and key {key.size(-3)}; "
            "pass enable_gqa=True for grouped-query attention"
        )
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "fusedformer.attention: attn_mask requires grad, but the fused kernel gives no gradient to the "
            "mask; detach it or use torch.nn.functional.scaled_dot_product_attention"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    dropout_p = float(dropout_p)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
    out, _ = _ops.attention_fwd(query, key, value, attn_mask, dropout_p, bool(is_causal), float(scale), seed)
    return out


def attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention within each of several sequences packed along the first dim, without padding.

    ``query`` is ``(T, H, E)``, ``key`` / ``value`` ``(T, Hkv, E)`` / ``(T, Hkv, Ev)`` (``H`` a multiple
    of ``Hkv``: grouped-query attention), any strides (e.g. views of one packed projection); sequence
    ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` (``cu_seqlens``: int64 or int32, ``batch + 1``
    entries from 0 to ``T``, nondecreasing) and attends only to its own keys (``is_causal``: key ``j``
    for query ``i`` when ``j <= i``). Returns ``(T, H, Ev)``, contiguous, so that ``.flatten(1)`` is the
    ``(T, H * Ev)`` input of the output projection without a copy. The result for sequence ``b`` equals
    :func:`attention` on its rows alone: no work is spent on padding, and no mask is read.

    On the CPU without autograd this is one op (``fusedformer::attention_varlen_fwd``) that runs the
    dense kernel on each sequence's rows in place. With autograd recording (an input that requires
    grad), or on another device, each sequence is a call of :func:`attention` on its rows (strided
    views, no copy in) and the outputs are concatenated: differentiable, on every device the dense op
    runs on, at one kernel launch per sequence.
    """
    for name, t in (("query", query), ("key", key), ("value", value), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fusedformer.attention_varlen: {name} must be a tensor, got {type(t).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1)) if query.dim() else 1.0
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if query.device.type == "cpu" and not needs_grad:
        return _ops.attention_varlen_fwd(query, key, value, cu_seqlens, bool(is_causal), float(scale))
    return _varlen_per_sequence(query, key, value, cu_seqlens, bool(is_causal), float(scale))


def _varlen_bounds(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor):
    """The checks of the C++ op (csrc/common/attention.cpp, check_cu_seqlens) for the per-sequence
    path, with the same messages; returns cu_seqlens as a list."""
    op = "fusedformer.attention_varlen"
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError(f"{op}: query, key and value must have shape (tokens, heads, head_dim), got "
                         f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    T = query.size(0)
    if key.size(0) != T or value.size(0) != T:
        raise ValueError(f"{op}: query, key and value must have the same number of tokens, got {T}, "
                         f"{key.size(0)} and {value.size(0)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D tensor of sequence starts and the total (batch + 1 "
                         f"entries), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: cu_seqlens must be int64 or int32, got {cu_seqlens.dtype}")
    c = cu_seqlens.tolist()
    if c[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got {c[0]}")
    for i in range(1, len(c)):
        if c[i] < c[i - 1]:
            raise ValueError(f"{op}: cu_seqlens must be nondecreasing, got {c[i - 1]} then {c[i]} at index {i}")
    if c[-1] != T:
        raise ValueError(f"{op}: cu_seqlens must end at the number of tokens ({T}), got {c[-1]}")
    return c


def _varlen_per_sequence(query, key, value, cu_seqlens, is_causal: bool, scale: float) -> torch.Tensor:
    """attention_varlen as one :func:`attention` call per sequence, on ``(H, n, E)`` views of its rows."""
    c = _varlen_bounds(query, key, value, cu_seqlens)
    gqa = query.size(1) != key.size(1)
    outs = [
        attention(query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1),
                  is_causal=is_causal, scale=scale, enable_gqa=gqa).transpose(0, 1)
        for s, e in zip(c, c[1:]) if e > s
    ]
    if not outs:  # no tokens
        return query.new_empty((0, query.size(1), value.size(2)))
    return torch.cat(outs)


@torch.library.register_fake("fusedformer::attention_varlen_fwd")
def _attention_varlen_fake(query, key, value, cu_seqlens, is_causal, scale):
    check_same_device("fusedformer.attention_varlen", "query", query, key=key, value=value)
    if query.dim() != 3 or value.dim() != 3:
        raise ValueError(f"fusedformer.attention_varlen: query and value must have shape (tokens, heads, head_dim), "
                         f"got {tuple(query.shape)} and {tuple(value.shape)}")
    return query.new_empty((query.shape[0], query.shape[1], value.shape[2]))


@torch.library.register_fake("fusedformer::attention_fwd")
def _attention_fwd_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    check_same_device("fusedformer.attention", "query", query, key=key, value=value, attn_mask=attn_mask)
    out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
    lse = query.new_empty(query.shape[:-1], dtype=torch.float64 if query.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.register_fake("fusedformer::attention_bwd")
def _attention_bwd_fake(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, seed):
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty_like(key, memory_format=torch.contiguous_format),
        torch.empty_like(value, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.dropout_p = dropout_p
    ctx.is_causal = is_causal
    ctx.scale = scale
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, attn_mask, seed = ctx.saved_tensors
    dq, dk, dv = _ops.attention_bwd(
        grad_out, query, key, value, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("fusedformer::attention_fwd", _backward, setup_context=_setup_context)
refuse_double_backward("fusedformer::attention_bwd")

"""fusedformer.ops.paged_attention: attention over a paged KV cache, and writing into it (serving).

The caches of one layer are two tensors ``(num_blocks, num_kv_heads, block_size, head_dim)``, for keys
and values: a pool of fixed-size blocks that sequences own through block tables, so that a cache
grows a block at a time and blocks can be shared (prefix caching) without copies.
"""

import math
from typing import Optional

import torch

from ._checks import check_same_device, check_tensor

_ops = torch.ops.fusedformer


def paged_cache_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores the keys and values of ``T`` new tokens into the caches, in place.

    ``key`` / ``value`` are ``(T, num_kv_heads, head_dim)``, any strides (e.g. column slices of a packed
    qkv projection), in the caches' dtype; ``slot_mapping`` (int64, ``(T,)``) gives each token's slot:
    block ``slot // block_size``, offset ``slot % block_size``. A negative slot skips the token
    (padding).
    """
    op = "fusedformer.paged_cache_write"
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("slot_mapping", slot_mapping)):
        check_tensor(op, name, t)
    _ops.paged_cache_write(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of packed queries of several sequences over their paged KV caches.

    ``query`` is ``(T, num_heads, head_dim)`` (any strides): sequence ``b`` owns the rows
    ``query_start_loc[b]:query_start_loc[b + 1]`` (``query_start_loc``: int64, ``B + 1`` entries from 0
    to ``T``; a sequence may have no rows). Its context is ``seq_lens[b]`` tokens (int64, ``(B,)``) held
    in the blocks ``block_tables[b, :ceil(seq_lens[b] / block_size)]`` (int64 or int32, ``(B,
    max_blocks)``) of ``key_cache`` / ``value_cache``, and its queries are the *last* tokens of that
    context: query ``i`` of a sequence with ``q_len`` rows is at position ``seq_lens[b] - q_len + i`` and
    attends to the keys at positions up to its own (causal, bottom-right aligned). One query per
    sequence is decoding; several are a chunk of a prefill, or a prefill after a prefix-cache hit, whose
    new keys were written with :func:`paged_cache_write` first. ``num_heads`` is a multiple of
    ``num_kv_heads`` (grouped-query attention: head ``h`` reads key/value head ``h // (num_heads //
    num_kv_heads)``). ``scale`` defaults to ``1 / sqrt(head_dim)``.

    Returns ``(T, num_heads, head_dim)``, contiguous, in the query dtype (accumulated in float32;
    float64 for float64). Inference only: there is no gradient, and a query that requires grad while
    grad mode is on is refused.
    """
    op = "fusedformer.paged_attention"
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        check_tensor(op, name, t)
    if torch.is_grad_enabled() and (query.requires_grad or key_cache.requires_grad or value_cache.requires_grad):
        raise RuntimeError(
            f"{op}: query or the caches require grad, but paged attention is inference only (no gradient); "
            "call it under torch.no_grad() / torch.inference_mode(), or use fusedformer.ops.attention"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1)) if query.dim() else 1.0
    return _ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                                float(scale))


def _fake_checks(op, ref_name, ref, **others):
    check_same_device(op, ref_name, ref, **others)
    for name, t in others.items():
        if name in ("key", "value", "query", "value_cache", "key_cache") and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


@torch.library.register_fake("fusedformer::paged_cache_write")
def _paged_cache_write_fake(key, value, key_cache, value_cache, slot_mapping):
    op = "fusedformer.paged_cache_write"
    _fake_checks(op, "key_cache", key_cache, value_cache=value_cache, key=key, value=value, slot_mapping=slot_mapping)
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"{op}: key_cache and value_cache must have one shape (num_blocks, num_kv_heads, "
                         f"block_size, head_dim), got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key.dim() != 3 or tuple(key.shape[1:]) != (key_cache.size(1), key_cache.size(3)) or value.shape != key.shape:
        raise ValueError(f"{op}: key and value must have shape (tokens, {key_cache.size(1)}, {key_cache.size(3)}), "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.dim() != 1 or slot_mapping.size(0) != key.size(0):
        raise ValueError(f"{op}: slot_mapping must be int64 of shape ({key.size(0)},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    return None


@torch.library.register_fake("fusedformer::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale):
    op = "fusedformer.paged_attention"
    _fake_checks(op, "query", query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                 seq_lens=seq_lens, query_start_loc=query_start_loc)
    if query.dim() != 3:
        raise ValueError(f"{op}: query must have shape (tokens, num_heads, head_dim), got {tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"{op}: key_cache and value_cache must have one shape (num_blocks, num_kv_heads, "
                         f"block_size, head_dim), got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.size(3) != query.size(2) or query.size(1) % key_cache.size(1) != 0:
        raise ValueError(f"{op}: key_cache {tuple(key_cache.shape)} does not match query {tuple(query.shape)} "
                         "(head dim, and num_heads a multiple of num_kv_heads)")
    if block_tables.dim() != 2 or seq_lens.dim() != 1 or query_start_loc.dim() != 1:
        raise ValueError(f"{op}: block_tables must be 2-D, seq_lens and query_start_loc 1-D")
    return query.new_empty(query.shape)

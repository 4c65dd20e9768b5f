"""The paged KV cache of a packed batch: keys and values live in fixed-size blocks that any sequence
can own through its block table, and one model step computes the tokens of many sequences at once,
packed one after another with no padding (what a serving engine's continuous batching feeds).

The attention of such a step writes the new keys/values into their slots, then lets each sequence's
queries (the last ``q_len`` tokens of its context) attend causally over its whole context, read
through its block table.
"""

import dataclasses
from typing import List

import torch

from .. import ops


@dataclasses.dataclass
class PagedAttentionMetadata:
    """Where a packed step's tokens go and what they attend to.

    ``slot_mapping`` (T,) int64: the cache slot (block * block_size + offset) of each new token;
    ``block_tables`` (B, max_blocks) int32: each sequence's blocks in order; ``seq_lens`` (B,) int64:
    each sequence's context length after this step; ``query_start_loc`` (B + 1,) int64: sequence b's
    new tokens are rows ``query_start_loc[b]:query_start_loc[b + 1]`` of the batch.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor


@dataclasses.dataclass
class PagedKVCache:
    """Per layer, the key and value blocks, each (num_blocks, n_kv_head, block_size, head_dim), and the
    metadata of the step being run (set by the caller before each step)."""

    key_caches: List[torch.Tensor]
    value_caches: List[torch.Tensor]
    metadata: PagedAttentionMetadata = None

    @classmethod
    def allocate(cls, n_layer, num_blocks, n_kv_head, block_size, head_dim, dtype, device):
        shape = (num_blocks, n_kv_head, block_size, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)])

    @property
    def block_size(self) -> int:
        return self.key_caches[0].shape[2]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor):
        """Copy blocks ``src`` to blocks ``dst`` (int64 (N,)) in every layer (copy-on-write)."""
        for kc, vc in zip(self.key_caches, self.value_caches):
            kc.index_copy_(0, dst, kc.index_select(0, src))
            vc.index_copy_(0, dst, vc.index_select(0, src))


def paged_self_attention(q, k, v, cache: PagedKVCache, layer: int, scale: float) -> torch.Tensor:
    """q (T, H, E), k/v (T, Hkv, E) of a packed step: writes k/v into the layer's blocks
    (``fusedformer.ops.paged_cache_write``), then returns the attention output (T, H, E) of each
    sequence's queries over its context read through its block table (``fusedformer.ops.paged_attention``:
    one call for the whole step, decodes and prefill chunks alike)."""
    meta = cache.metadata
    kc, vc = cache.key_caches[layer], cache.value_caches[layer]
    ops.paged_cache_write(k, v, kc, vc, meta.slot_mapping)
    return ops.paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale=scale)

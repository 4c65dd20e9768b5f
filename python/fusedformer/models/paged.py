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
    """q (T, H, E), k/v (T, Hkv, E) of a packed step: writes k/v into the layer's blocks, then returns
    the attention output (T, H, E) of each sequence's queries over its context."""
    meta = cache.metadata
    kc, vc = cache.key_caches[layer], cache.value_caches[layer]
    _write(k, v, kc, vc, meta.slot_mapping)
    return _attend(q, kc, vc, meta, scale)


def _write(k, v, kc, vc, slot_mapping):
    # one indexed copy per tensor: the slot's block and offset, all heads at once
    bs = kc.shape[2]
    block, offset = slot_mapping.div(bs, rounding_mode="floor"), slot_mapping.remainder(bs)
    kc[block, :, offset] = k
    vc[block, :, offset] = v


def _attend(q, kc, vc, meta: PagedAttentionMetadata, scale: float) -> torch.Tensor:
    T, H, E = q.shape
    Hkv, bs = kc.shape[1], kc.shape[2]
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    for b, L in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        ql = e - s
        nb = -(-L // bs)
        blocks = meta.block_tables[b, :nb].long()
        # (nb, Hkv, bs, E) -> (Hkv, nb * bs, E), the first L positions
        keys = kc.index_select(0, blocks).transpose(0, 1).reshape(Hkv, nb * bs, E)[:, :L]
        values = vc.index_select(0, blocks).transpose(0, 1).reshape(Hkv, nb * bs, E)[:, :L]
        # the queries are the last ql positions of the context: query i sees keys up to L - ql + i
        mask = None if ql == 1 else torch.ones(ql, L, dtype=torch.bool, device=q.device).tril_(L - ql)
        y = ops.attention(q[s:e].transpose(0, 1), keys, values, attn_mask=mask, scale=scale, enable_gqa=H != Hkv)
        out[s:e] = y.transpose(0, 1)
    return out

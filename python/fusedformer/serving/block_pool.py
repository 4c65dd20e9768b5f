"""The pool of fixed-size KV blocks: which blocks are free, who holds each one (reference counts, so that
the samples of one prompt share its blocks until one writes: copy-on-write), and the prefix cache.

A full block is keyed by a hash chained from the previous block's key and its own token ids, so that
the key names the whole prefix up to the block's end. A block freed by every holder keeps its key and
its contents until the pool hands it out again, least recently freed first (LRU): a later request
that starts with the same tokens takes those blocks back instead of recomputing them.

The pool holds bookkeeping only; the key/value tensors the block ids index live with the model runner.
"""

import collections
import math
from typing import Dict, List, Optional, Sequence, Tuple

DEFAULT_BLOCK_SIZE = 16

# the key of the (empty) prefix before a sequence's first block
ROOT_KEY = 0


def block_key(parent_key: int, tokens: Sequence[int]) -> int:
    """The prefix-cache key of a full block of ``tokens`` that follows the block keyed ``parent_key``."""
    return hash((parent_key, tuple(tokens)))


def block_keys(token_ids: Sequence[int], block_size: int, start: int = 0, parent_key: int = ROOT_KEY) -> List[int]:
    """The keys of the full blocks of ``token_ids`` from block index ``start`` on (``parent_key`` is the
    key of block ``start - 1``)."""
    keys = []
    for b in range(start, len(token_ids) // block_size):
        parent_key = block_key(parent_key, token_ids[b * block_size:(b + 1) * block_size])
        keys.append(parent_key)
    return keys


def kv_block_bytes(n_layer: int, n_kv_head: int, head_dim: int, block_size: int, element_size: int) -> int:
    """Bytes one block takes: keys and values of ``block_size`` tokens in every layer."""
    return 2 * n_layer * n_kv_head * head_dim * block_size * element_size


def num_blocks_for(block_bytes: int, kv_cache_memory: Optional[int] = None, kv_cache_fraction: Optional[float] = None,
                   free_memory: Optional[int] = None) -> int:
    """How many blocks of ``block_bytes`` fit in ``kv_cache_memory`` bytes, or in ``kv_cache_fraction`` of
    ``free_memory`` bytes (one of the two)."""
    if (kv_cache_memory is None) == (kv_cache_fraction is None):
        raise ValueError("kv cache size: give exactly one of kv_cache_memory and kv_cache_fraction")
    if kv_cache_memory is not None:
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes; got {kv_cache_memory!r}")
        budget = kv_cache_memory
    else:
        if isinstance(kv_cache_fraction, bool) or not isinstance(kv_cache_fraction, (int, float)) \
                or not 0.0 < kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1]; got {kv_cache_fraction!r}")
        budget = int(free_memory * kv_cache_fraction)
    n = budget // block_bytes
    if n < 1:
        raise ValueError(f"kv cache size: {budget} bytes hold no block of {block_bytes} bytes; give more memory")
    return n


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` token slots, by id 0..num_blocks-1.

    ``allocate`` hands out a block with one holder, evicting the least recently freed cached block if it
    must; ``hold`` adds a holder (a fork, or a prefix-cache hit); ``release`` drops one, and a block
    with none is free again (still cached if it was). ``cache`` gives a full block its key; ``lookup``
    finds a block by key.
    """

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"BlockPool: num_blocks must be a positive integer; got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"BlockPool: block_size must be a positive integer; got {block_size!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.keys: List[Optional[int]] = [None] * num_blocks
        self.cached: Dict[int, int] = {}  # key -> block id
        # free blocks, least recently freed first (an ordered set: O(1) removal on a cache hit)
        self._free = collections.OrderedDict((b, None) for b in range(num_blocks))
        self.hits = 0  # prefix-cache blocks taken back (statistics)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("BlockPool: no free block (the scheduler checks num_free first)")
        block, _ = self._free.popitem(last=False)
        key = self.keys[block]
        if key is not None:  # evicted from the prefix cache
            del self.cached[key]
            self.keys[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate_many(self, n: int) -> List[int]:
        if n > len(self._free):
            raise RuntimeError(f"BlockPool: {n} blocks asked for, {len(self._free)} free")
        return [self.allocate() for _ in range(n)]

    def hold(self, block: int):
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def release(self, block: int):
        rc = self.ref_counts[block]
        if rc <= 0:
            raise RuntimeError(f"BlockPool: block {block} released more often than held")
        self.ref_counts[block] = rc - 1
        if rc == 1:
            self._free[block] = None

    def release_all(self, blocks: Sequence[int]):
        """Release a sequence's blocks, last first: its tail, the part least likely shared with another
        prompt, is then evicted before its head."""
        for b in reversed(blocks):
            self.release(b)

    def cache(self, block: int, key: int):
        """Enter a full block under ``key``. If another block already holds that key (two sequences
        computed the same prefix at once), the first one stays the cached one."""
        if self.keys[block] is None and key not in self.cached:
            self.keys[block] = key
            self.cached[key] = block

    def lookup(self, key: int) -> Optional[int]:
        return self.cached.get(key)

    def match_prefix(self, keys: Sequence[int]) -> List[int]:
        """The cached blocks of the longest prefix of ``keys`` (block keys from the first block on),
        without holding them."""
        blocks = []
        for k in keys:
            b = self.cached.get(k)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def needs_copy(self, block: int) -> bool:
        """Whether a holder must copy the block before writing into it (someone else holds it too)."""
        return self.ref_counts[block] > 1

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @property
    def num_held(self) -> int:
        """Blocks with at least one holder (0 once every request has ended)."""
        return sum(1 for rc in self.ref_counts if rc > 0)

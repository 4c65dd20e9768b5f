"""Continuous batching: which tokens of which sequences the next model step computes.

Every step, the running sequences come first, oldest first: each computes its uncomputed tokens (one,
the last sampled token, when decoding; a chunk of its prompt while prefilling), within a budget of
``max_num_batched_tokens`` tokens per step. Then waiting sequences are admitted, first come first
served, while the budget and ``max_num_seqs`` allow and the pool has blocks for their first chunk; a
prompt longer than the budget left is prefilled in chunks over several steps, beside the decodes.
When the pool runs out, the newest running sequence is preempted: its blocks go back to the pool and
it waits at the head of the queue, to be recomputed (its prompt and output so far) when there is room.
No sequence is dropped: a request too large for the whole pool is refused when it is added.
"""

import collections
import dataclasses
from typing import List, Tuple

from .block_pool import BlockPool, block_keys
from .sequence import Sequence, Status


@dataclasses.dataclass
class SchedulerOutput:
    """``scheduled``: (sequence, number of its tokens to compute this step), in batch order;
    ``copies``: (source, destination) blocks to copy before the step (copy-on-write)."""

    scheduled: List[Tuple[Sequence, int]]
    copies: List[Tuple[int, int]]
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: collections.deque = collections.deque()
        self.running: List[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        out = SchedulerOutput([], [])
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while self._blocks_needed(seq, n) > self.pool.num_free:
                victim = self.running[-1]  # the newest; never one already scheduled (those come before i)
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self._reserve(seq, n, out.copies)
            out.scheduled.append((seq, n))
            budget -= n
            i += 1
        if out.num_preempted:  # the pool is short: admit nobody this step
            return out
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + seq.fork_width > self.max_num_seqs:
                break
            hits = self._prefix_hits(seq)
            start = len(hits) * self.pool.block_size
            n = min(len(seq.token_ids) - start, budget)
            new_blocks = self.pool.blocks_for(start + n) - len(hits)
            revived = sum(1 for b in hits if self.pool.ref_counts[b] == 0)  # cached but free: leave the free list
            if new_blocks + revived > self.pool.num_free:
                break
            self.waiting.popleft()
            for b in hits:
                self.pool.hold(b)
            self.pool.hits += len(hits)
            seq.block_table = hits + self.pool.allocate_many(new_blocks)
            seq.num_computed = start
            seq.num_cached_blocks = len(hits)
            if seq.request.num_cached_tokens is None:
                seq.request.num_cached_tokens = start
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def computed(self, out: SchedulerOutput):
        """After the step: advance each scheduled sequence and enter its newly filled blocks in the prefix cache."""
        bs = self.pool.block_size
        for seq, n in out.scheduled:
            seq.num_computed += n
            if not self.enable_prefix_caching:
                continue
            full = seq.num_computed // bs
            if len(seq.block_keys) < full:
                parent = seq.block_keys[-1] if seq.block_keys else 0
                seq.block_keys += block_keys(seq.token_ids[:full * bs], bs, len(seq.block_keys), parent)
            for b in range(seq.num_cached_blocks, full):
                self.pool.cache(seq.block_table[b], seq.block_keys[b])
            seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def kv_tokens_held(self) -> int:
        """Tokens whose keys and values the blocks of the running sequences hold, a block shared by several
        sequences (forked samples, prefix-cache hits) counted once: its holders have the same tokens in it,
        since a holder copies a shared block before writing into it."""
        total = sum(seq.num_computed for seq in self.running)
        if sum(len(seq.block_table) for seq in self.running) == self.pool.num_used:
            return total  # every block in use has one holder
        bs, seen = self.pool.block_size, set()
        for seq in self.running:
            for i, b in enumerate(seq.block_table):
                if self.pool.ref_counts[b] > 1:
                    if b in seen:
                        total -= max(0, min(bs, seq.num_computed - i * bs))
                    else:
                        seen.add(b)
        return total

    def fork(self, parent: Sequence, child: Sequence):
        """``child`` starts as a copy of ``parent``'s state, holding the same blocks (copy-on-write)."""
        for b in parent.block_table:
            self.pool.hold(b)
        child.block_table = list(parent.block_table)
        child.block_keys = list(parent.block_keys)
        child.num_cached_blocks = parent.num_cached_blocks
        child.num_computed = parent.num_computed
        child.status = Status.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence):
        """A finished sequence gives its blocks back at once."""
        self.pool.release_all(seq.block_table)
        seq.block_table = []
        seq.status = Status.FINISHED
        self.running.remove(seq)

    def _prefix_hits(self, seq: Sequence) -> List[int]:
        """Cached blocks for the start of a sequence about to be admitted. At least its last token is
        always computed (its logits are needed), so a block holding that token is never taken."""
        if not self.enable_prefix_caching:
            return []
        bs = self.pool.block_size
        usable = (len(seq.token_ids) - 1) // bs
        if len(seq.block_keys) < usable:
            parent = seq.block_keys[-1] if seq.block_keys else 0
            seq.block_keys += block_keys(seq.token_ids[:usable * bs], bs, len(seq.block_keys), parent)
        return self.pool.match_prefix(seq.block_keys[:usable])

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        """Blocks to allocate so that ``seq`` can write its next ``n`` tokens: new ones past its table, and
        one copy if the block it writes into first is shared."""
        bs = self.pool.block_size
        new = self.pool.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if seq.num_computed % bs and self.pool.needs_copy(seq.block_table[seq.num_computed // bs]):
            new += 1
        return new

    def _reserve(self, seq: Sequence, n: int, copies: List[Tuple[int, int]]):
        bs = self.pool.block_size
        if seq.num_computed % bs:
            i = seq.num_computed // bs
            old = seq.block_table[i]
            if self.pool.needs_copy(old):
                new = self.pool.allocate()
                copies.append((old, new))
                self.pool.release(old)
                seq.block_table[i] = new
        more = self.pool.blocks_for(seq.num_computed + n) - len(seq.block_table)
        if more > 0:
            seq.block_table += self.pool.allocate_many(more)

    def _preempt(self, seq: Sequence):
        self.running.remove(seq)
        self.pool.release_all(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_cached_blocks = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

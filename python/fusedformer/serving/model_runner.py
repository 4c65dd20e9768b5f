"""Runs one scheduled step through the model: the tokens of every scheduled sequence packed into one
batch (no padding), their keys/values written into the paged cache, and the logits of the sequences
whose last token was computed (those that sample next)."""

from typing import List, Tuple

import torch

from ..models.paged import PagedAttentionMetadata
from .scheduler import SchedulerOutput
from .sequence import Sequence


class ModelRunner:
    """Owns the model and its KV blocks (``num_blocks`` of ``block_size`` tokens)."""

    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model
        self.device = model.embed.weight.device
        self.block_size = block_size
        self.cache = model.new_paged_cache(num_blocks, block_size)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> Tuple[torch.Tensor, List[Sequence]]:
        """The logits (S, V) and the S sequences they are for, in batch order."""
        if out.copies:
            src, dst = zip(*out.copies)
            self.cache.copy_blocks(self._long(src), self._long(dst))
        bs = self.block_size
        ids, positions, slots, starts, lens, last_rows, samplers = [], [], [], [0], [], [], []
        width = max(len(seq.block_table) for seq, _ in out.scheduled)
        tables = torch.zeros(len(out.scheduled), width, dtype=torch.int32)
        for b, (seq, n) in enumerate(out.scheduled):
            s, e = seq.num_computed, seq.num_computed + n
            ids += seq.token_ids[s:e]
            positions += range(s, e)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(s, e)]
            tables[b, :len(table)] = torch.tensor(table, dtype=torch.int32)
            starts.append(starts[-1] + n)
            lens.append(e)
            if e == len(seq.token_ids):
                last_rows.append(starts[-1] - 1)
                samplers.append(seq)
        self.cache.metadata = PagedAttentionMetadata(
            slot_mapping=self._long(slots), block_tables=tables.to(self.device), seq_lens=self._long(lens),
            query_start_loc=self._long(starts))
        logits = self.model.forward_packed(self._long(ids), self._long(positions), self.cache,
                                           self._long(last_rows))
        return logits, samplers

    def _long(self, values) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.long, device=self.device)

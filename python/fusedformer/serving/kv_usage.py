"""How full the KV blocks in use are: after every model step, the tokens whose keys and values the cache
holds against the slots of the blocks in use (blocks in use x block size). A block's unused tail (the
last block of each sequence) and a block reserved but not yet written lower it; blocks shared by forked
samples or prefix-cache hits count once. Kept: the last step's figures, those of the step with the most
blocks in use (the first such step), and the mean utilization over steps."""

import dataclasses
from typing import Dict


@dataclasses.dataclass
class KVCacheUsage:
    block_size: int
    steps: int = 0
    blocks_in_use: int = 0  # the last step's
    tokens_held: int = 0
    peak_blocks_in_use: int = 0  # the step with the most blocks in use (the first one, on a tie)
    tokens_at_peak: int = 0
    _utilization_sum: float = 0.0

    def record(self, blocks_in_use: int, tokens_held: int):
        """One step's figures: ``blocks_in_use`` blocks hold ``tokens_held`` tokens."""
        if blocks_in_use < 1:
            return
        if not 0 <= tokens_held <= blocks_in_use * self.block_size:
            raise ValueError(f"KVCacheUsage: {tokens_held} tokens cannot be held by {blocks_in_use} blocks of "
                             f"{self.block_size}")
        self.steps += 1
        self.blocks_in_use, self.tokens_held = blocks_in_use, tokens_held
        self._utilization_sum += self.utilization
        if blocks_in_use > self.peak_blocks_in_use:
            self.peak_blocks_in_use, self.tokens_at_peak = blocks_in_use, tokens_held

    def _ratio(self, tokens: int, blocks: int) -> float:
        return tokens / (blocks * self.block_size) if blocks else 0.0

    @property
    def utilization(self) -> float:
        """The last step's tokens held / (blocks in use x block size) (0 before any step)."""
        return self._ratio(self.tokens_held, self.blocks_in_use)

    @property
    def utilization_at_peak(self) -> float:
        """The utilization of the step with the most blocks in use."""
        return self._ratio(self.tokens_at_peak, self.peak_blocks_in_use)

    @property
    def mean_utilization(self) -> float:
        """The mean over steps of each step's utilization."""
        return self._utilization_sum / self.steps if self.steps else 0.0

    def reset(self):
        """Forget every step so far (to measure one workload on an engine that ran others)."""
        self.steps = self.blocks_in_use = self.tokens_held = self.peak_blocks_in_use = self.tokens_at_peak = 0
        self._utilization_sum = 0.0

    def as_dict(self) -> Dict[str, float]:
        return {"kv_steps": self.steps, "kv_blocks_in_use": self.blocks_in_use, "kv_tokens_held": self.tokens_held,
                "kv_utilization": self.utilization, "kv_peak_blocks_in_use": self.peak_blocks_in_use,
                "kv_tokens_at_peak": self.tokens_at_peak, "kv_utilization_at_peak": self.utilization_at_peak,
                "kv_mean_utilization": self.mean_utilization}

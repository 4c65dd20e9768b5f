"""A request and its sequences (one per sample): the tokens so far, how many of them have keys and values
in the cache, and the blocks that hold them."""

import dataclasses
import enum
from typing import Any, Dict, List, Optional, Union

import torch

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    params: SamplingParams
    arrival: int
    sequences: List["Sequence"] = dataclasses.field(default_factory=list)
    num_cached_tokens: Optional[int] = None  # set when the request is first scheduled

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(s.status is Status.FINISHED for s in self.sequences)


@dataclasses.dataclass(eq=False)
class Sequence:
    """One sample of a request. ``token_ids`` = prompt + output; the first ``num_computed`` have their
    keys/values in the blocks of ``block_table``. A sequence whose prompt is not yet computed stands for
    all ``n`` samples (``fork_width``): they split off it, sharing its blocks, when its prompt is done."""

    seq_id: int
    request: Request
    index: int
    token_ids: List[int]
    generator: Optional[torch.Generator] = None
    fork_width: int = 1
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: List[int] = dataclasses.field(default_factory=list)
    block_keys: List[int] = dataclasses.field(default_factory=list)  # prefix-cache keys of its full blocks
    num_cached_blocks: int = 0  # blocks of block_table entered in the prefix cache
    cumulative_logprob: float = 0.0
    logprobs: Optional[List[Dict]] = None
    text: str = ""
    detok: Any = None  # the output's tokenizer.IncrementalText, for stop strings
    stop_searched: int = 0  # characters of that text already searched for stop strings
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> List[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

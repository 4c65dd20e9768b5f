"""What ``LLM.generate`` returns: one RequestOutput per prompt, with one CompletionOutput per sample."""

import dataclasses
from typing import Dict, List, Optional, Union


@dataclasses.dataclass
class Logprob:
    """The log-probability of one token under the model (log_softmax of its logits), its rank among
    the vocabulary (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


@dataclasses.dataclass
class CompletionOutput:
    """One sample. ``finish_reason``: "stop" (EOS, a stop token or a stop string; ``stop_reason`` says
    which token id or string, None for EOS), "length" (max_tokens or the model's context), or None
    while unfinished. ``logprobs``: one {token_id: Logprob} per output token when asked for."""

    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[List[Dict[int, Logprob]]]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """One prompt's outputs. ``prompt`` is None for a prompt given as token ids; ``num_cached_tokens``
    counts the prompt tokens whose keys and values came from the prefix cache instead of the model."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0

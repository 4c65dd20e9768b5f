"""SamplingParams: how the engine chooses and stops the tokens of one request, with the fields and
defaults users know from vLLM. Every field is checked when the object is made, and a bad value raises
a ValueError that names it."""

import dataclasses
from typing import List, Optional, Union


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling and stopping.

    ``n`` samples of the prompt (sharing its KV blocks); ``temperature`` 0 is greedy; ``top_p``,
    ``top_k`` (0 or -1: off), ``min_p`` filter the distribution; ``repetition_penalty`` (over prompt and
    output, HuggingFace's rule), ``presence_penalty`` and ``frequency_penalty`` (over the output,
    OpenAI's rule) shape it. Generation ends after ``max_tokens`` tokens, at the model's EOS (unless
    ``ignore_eos``), at a token of ``stop_token_ids`` or when the text contains a string of ``stop``
    (left out of the text); none of these before ``min_tokens`` tokens. ``seed`` makes the draws of
    this request reproducible whatever else runs beside it. ``logprobs`` = k returns, for every output
    token, the log-probabilities of the k most likely tokens and of the chosen one.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    seed: Optional[int] = None
    logprobs: Optional[int] = None

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _int(self, "n", low=1)
        _number(self, "temperature", low=0.0)
        _number(self, "top_p", low=0.0, low_open=True, high=1.0)
        _int(self, "top_k", low=0)
        _number(self, "min_p", low=0.0, high=1.0)
        _number(self, "repetition_penalty", low=0.0, low_open=True)
        _number(self, "presence_penalty", low=-2.0, high=2.0)
        _number(self, "frequency_penalty", low=-2.0, high=2.0)
        if self.max_tokens is not None:
            _int(self, "max_tokens", low=1)
        _int(self, "min_tokens", low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams: min_tokens ({self.min_tokens}) must not exceed max_tokens "
                             f"({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams: stop must hold non-empty strings; got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"SamplingParams: stop_token_ids must hold non-negative integers; got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams: ignore_eos must be a bool; got {self.ignore_eos!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams: seed must be an integer or None; got {self.seed!r}")
        if self.logprobs is not None:
            _int(self, "logprobs", low=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(p, name, low):
    v = getattr(p, name)
    if not _is_int(v) or v < low:
        raise ValueError(f"SamplingParams: {name} must be an integer >= {low}; got {v!r}")


def _number(p, name, low=None, high=None, low_open=False):
    v = getattr(p, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise ValueError(f"SamplingParams: {name} must be a number {' and '.join(x for x in (lo, hi) if x)}; "
                         f"got {v!r}")
    setattr(p, name, float(v))

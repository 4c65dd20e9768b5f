"""The request bodies of the OpenAI-compatible server (OpenAI's fields, with vLLM's sampling extras), and
how each becomes SamplingParams. Fields the server ignores (``user``, ``logit_bias``, ...) are accepted
and dropped; a field of the wrong type is a 400 that names it."""

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .sampling_params import SamplingParams

MAX_LOGPROBS = 20  # top log-probabilities a request may ask for, per token


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Optional[str] = None
    # vLLM's extras
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        """SamplingParams for this request (``max_tokens`` already defaulted and checked); a bad value
        raises ValueError naming the field."""
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, seed=self.seed,
            logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions. ``prompt``: a string or a list of token ids, or a list of strings or of token-id
    lists (a batch: one request per prompt, prompt p's sample j answered as choice p * n + j);
    ``logprobs``: the number of top log-probabilities per output token. ``max_tokens`` defaults to 16."""

    prompt: Union[str, List[int], List[str], List[List[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Optional[Union[str, List[Dict[str, Any]]]] = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a list of content parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions. ``logprobs`` (bool) with ``top_logprobs`` (int) as OpenAI's;
    ``max_tokens`` (or ``max_completion_tokens``) defaults to what the context leaves."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

"""Serving: a paged KV cache with prefix caching, continuous batching and the offline ``LLM`` engine
(``LLM(model).generate(prompts, SamplingParams(...))``). The OpenAI-compatible HTTP server is
``serving.server`` (``python -m fusedformer serve``; it needs fastapi, uvicorn and prometheus-client, so it
is imported only there)."""

from .engine import LLM, LLMEngine
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]

"""Logits processing and token choice for generation, vectorised over the batch and the vocabulary:
repetition penalty, then (when sampling) temperature, top-k, top-p and min-p, in HuggingFace
transformers' order and with its tie rules."""

from typing import Optional

import torch

_NEG_INF = float("-inf")


def check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty):
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"generate: temperature must be a positive number; got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"generate: top_k must be a non-negative integer or None; got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p must be in (0, 1]; got {top_p!r}")
    if min_p is not None and (not isinstance(min_p, (int, float)) or not 0.0 <= min_p <= 1.0):
        raise ValueError(f"generate: min_p must be in [0, 1]; got {min_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise ValueError(f"generate: repetition_penalty must be a positive number; got {repetition_penalty!r}")


def process_logits(logits: torch.Tensor, seqs: torch.Tensor, *, do_sample=False, temperature=1.0,
                   top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                   repetition_penalty=1.0, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Scores (B, V) in float32 from the last position's logits (B, V); ``seqs`` (B, T) the tokens so far
    (prompt included), for the repetition penalty. Filtered tokens get -inf."""
    scores = logits if logits.dtype == torch.float32 else logits.float()
    if repetition_penalty != 1.0:
        seen = scores.gather(1, seqs)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, seqs, seen)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = scores / temperature
    V = scores.shape[-1]
    if top_k:
        k = min(max(top_k, min_tokens_to_keep), V)
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, _NEG_INF)
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[..., -min_tokens_to_keep:] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, _NEG_INF)
    if min_p is not None:
        probs = scores.softmax(-1)
        threshold = probs.amax(-1, keepdim=True) * min_p
        drop = probs < threshold
        keep_idx = torch.topk(probs, min(min_tokens_to_keep, V), dim=-1).indices
        drop.scatter_(-1, keep_idx, False)
        scores = scores.masked_fill(drop, _NEG_INF)
    return scores


def select_tokens(scores: torch.Tensor, do_sample: bool, generator: Optional[torch.Generator] = None):
    """(B, V) scores -> (B,) tokens: argmax, or a draw from softmax(scores) with ``generator``."""
    if not do_sample:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

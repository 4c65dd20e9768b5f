"""Token choice for one engine step: each row of logits belongs to a sequence with its own
SamplingParams and random generator, so a seeded request draws the same tokens whatever else is in
the batch. Rows that are plain greedy are chosen together; the others one by one, with
fusedformer.sampling's processing (repetition penalty, temperature, top-k, top-p, min-p, in
HuggingFace's order) after min_tokens masking and OpenAI's presence/frequency penalties.

Log-probabilities are those of the model (log_softmax of the raw logits), as vLLM returns them."""

import dataclasses
from typing import Dict, List, Optional, Sequence as Seq

import torch

from ..sampling import process_logits, select_tokens
from .outputs import Logprob
from .sequence import Sequence


@dataclasses.dataclass
class Sampled:
    token: int
    logprob: float
    top: Optional[Dict[int, Logprob]]  # when the request asked for logprobs


def sample(logits: torch.Tensor, seqs: Seq[Sequence], eos_token_id: Optional[int],
           default_generator: Optional[torch.Generator]) -> List[Sampled]:
    """logits (S, V), row i for ``seqs[i]`` (whose token_ids are its prompt and output so far)."""
    scores = logits.float()
    logprobs = torch.log_softmax(scores, dim=-1)
    choice = scores.argmax(-1).tolist()  # the greedy choice, right for every plain greedy row
    out = []
    for i, seq in enumerate(seqs):
        p = seq.request.params
        if not p.greedy or p.penalized or _blocked_ids(seq, eos_token_id):
            choice[i] = _choose(scores[i], seq, eos_token_id, default_generator)
        tok = choice[i]
        row = logprobs[i]
        lp = float(row[tok])
        top = None
        if p.logprobs is not None:
            top = {}
            if p.logprobs:
                values, ids = torch.topk(row, min(p.logprobs, row.numel()))
                for r, (t, v) in enumerate(zip(ids.tolist(), values.tolist())):
                    top[t] = Logprob(v, r + 1)
            if tok not in top:
                top[tok] = Logprob(lp, int((row > row[tok]).sum()) + 1)
        out.append(Sampled(tok, lp, top))
    return out


def _blocked_ids(seq: Sequence, eos_token_id: Optional[int]) -> List[int]:
    """The tokens that may not come yet: EOS and stop tokens before min_tokens."""
    p = seq.request.params
    if len(seq.token_ids) - seq.prompt_len >= p.min_tokens:
        return []
    ids = list(p.stop_token_ids)
    if eos_token_id is not None and not p.ignore_eos:
        ids.append(eos_token_id)
    return ids


def _choose(scores: torch.Tensor, seq: Sequence, eos_token_id, default_generator) -> int:
    p = seq.request.params
    scores = scores.clone()
    blocked = _blocked_ids(seq, eos_token_id)
    if blocked:
        scores[torch.tensor(blocked, device=scores.device)] = float("-inf")
    if p.presence_penalty or p.frequency_penalty:
        out_ids = seq.output_ids
        if out_ids:
            counts = torch.bincount(torch.tensor(out_ids, device=scores.device), minlength=scores.numel())
            counts = counts.to(scores.dtype)
            scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores.dtype)
    seqs = torch.tensor([seq.token_ids], device=scores.device)
    do_sample = not p.greedy
    scores = process_logits(scores[None], seqs, do_sample=do_sample, temperature=p.temperature if do_sample else 1.0,
                            top_k=p.top_k or None, top_p=p.top_p, min_p=p.min_p or None,
                            repetition_penalty=p.repetition_penalty)
    gen = seq.generator if seq.generator is not None else default_generator
    return int(select_tokens(scores, do_sample, gen)[0])

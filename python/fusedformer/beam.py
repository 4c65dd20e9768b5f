"""Beam search with HuggingFace transformers' scoring, vectorised over the batch and the beams.

``generate(model, ..., num_beams=K)`` calls :func:`beam_search` with a run of the model (see
fusedformer.generation) that holds every prompt K times, as consecutive rows of its KV cache.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .sampling import process_logits

# The score of a hypothesis that must not be chosen: the first step's duplicate beams, a candidate
# that cannot go on or finish, an empty slot of the finished set. It is added to scores (as
# ``mask * EXCLUDED``), so it is finite: ``0 * -inf`` would be NaN where the mask is 0. Real scores
# (summed log-probabilities) stay far above it.
EXCLUDED = -1e9


def beam_search(run, *, max_new_tokens: int, num_beams: int, eos: Optional[list], pad: int,
                length_penalty: float = 1.0, do_sample: bool = False, temperature: float = 1.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                repetition_penalty: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The best of ``num_beams`` hypotheses for each prompt of ``run.prompt`` (B, P): (B, P + n).

    The ``num_beams`` best running hypotheses grow by the best continuations of their summed
    log-probabilities; a hypothesis that ends (a token of ``eos`` or the length limit) is scored
    ``sum_logprobs / generated_length ** length_penalty`` and kept among the ``num_beams`` best
    finished ones; the search stops when no running beam can beat the worst finished one. ``run``
    holds each prompt ``num_beams`` times (rows ``b * num_beams + k``) and has ``prefill()``,
    ``step(tokens)`` and ``reorder(rows)``. Unused positions of the result hold ``pad``.
    """
    K = num_beams
    prompt = run.prompt
    B, P = prompt.shape
    L = P + max_new_tokens
    device = prompt.device
    eos_t = torch.tensor(eos, device=device) if eos else None
    # Each EOS token can send one of a beam's continuations to the finished set, so a beam needs
    # 1 + n_eos continuations (at least 2) for one to go on: the candidates of a step, and the tokens
    # that top-k / top-p / min-p must leave, as HuggingFace counts them.
    per_beam = 1 + max(1, len(eos or []))
    n_candidates = per_beam * K

    running = torch.full((B, K, L), pad, dtype=torch.long, device=device)  # (B, K, L) token ids
    running[:, :, :P] = prompt[:, None]
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = EXCLUDED  # the K copies of a prompt are one hypothesis until the first step
    done = running.clone()  # the K best finished hypotheses, best first
    done_scores = torch.full((B, K), EXCLUDED, device=device)
    done_flag = torch.zeros(B, K, dtype=torch.bool, device=device)  # slot holds a finished hypothesis
    done_len = torch.zeros(B, K, dtype=torch.long, device=device)  # its generated length
    # only the K best candidates of a step may finish (HF's rule); those ranked lower are dropped
    may_finish = torch.arange(n_candidates, device=device) < K
    open_ = torch.ones(B, 1, dtype=torch.bool, device=device)  # a running beam can still beat done
    batch_offset = torch.arange(B, device=device)[:, None] * K

    logits = run.prefill()  # (B * K, V) at the last prompt position
    for t in range(max_new_tokens):
        cur = P + t  # the position the step's tokens take
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = process_logits(logp, running.view(B * K, L)[:, :cur], do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              min_tokens_to_keep=per_beam)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        if do_sample:
            idx = torch.multinomial(F.softmax(acc, dim=-1), n_candidates, generator=generator)
            top = acc.gather(1, idx)
        else:
            top, idx = acc.topk(n_candidates, dim=1)
        src_beam, tok = idx // V, idx % V
        cand = running.gather(1, src_beam[:, :, None].expand(B, n_candidates, L)).clone()
        cand[:, :, cur] = tok
        hits = torch.isin(tok, eos_t) if eos_t is not None else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= L:  # the length limit ends every candidate
            hits = torch.ones_like(hits)
        # the K best candidates that go on
        r_scores = top + hits.float() * EXCLUDED
        nxt = r_scores.topk(K, dim=1).indices
        running = cand.gather(1, nxt[:, :, None].expand(B, K, L))
        running_scores = r_scores.gather(1, nxt)
        beam_src = src_beam.gather(1, nxt)
        # the K best finished hypotheses, from the finished set and the candidates that end now
        just = hits & may_finish
        f_scores = top / float(cur + 1 - P) ** length_penalty
        f_scores = f_scores + (~open_).float() * EXCLUDED + (~just).float() * EXCLUDED
        m_scores = torch.cat((done_scores, f_scores), 1)
        sel = m_scores.topk(K, dim=1).indices
        done = torch.cat((done, cand), 1).gather(1, sel[:, :, None].expand(B, K, L))
        done_scores = m_scores.gather(1, sel)
        done_flag = torch.cat((done_flag, just), 1).gather(1, sel)
        done_len = torch.cat((done_len, torch.full_like(tok, cur + 1 - P)), 1).gather(1, sel)
        # could a running beam still beat the worst finished one?
        best_possible = running_scores[:, :1] / float(cur + 1 - P) ** length_penalty
        worst_done = torch.where(done_flag, done_scores.min(1, keepdim=True).values, EXCLUDED)
        open_ = open_ & (best_possible > worst_done).any(-1, keepdim=True)
        if not bool(open_.any()) or bool(hits.all()) or cur + 1 >= L:
            break
        run.reorder((beam_src + batch_offset).view(-1))
        logits = run.step(running[:, :, cur].reshape(-1))
    n = int(done_len[:, 0].max())
    return done[:, 0, :P + n]

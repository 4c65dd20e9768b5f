"""Text generation: a preallocated KV cache, prefill then one-token decode steps, greedy or sampled
decoding (temperature, top-k, top-p, min-p, repetition penalty), per-sequence EOS, left-padded
batches, beam search (decoder-only and encoder-decoder) and streaming.

``generate(model, input_ids, ...)`` returns the sequences; ``stream(model, input_ids, ...)`` yields
each step's tokens as they come; ``TokenStreamer`` is an iterator fed by ``generate(streamer=...)``
running in another thread. The logits processing follows HuggingFace transformers' order (repetition
penalty, then temperature, top-k, top-p, min-p), so that greedy decoding, and sampling with the same
random numbers, match it token for token.
"""

import queue
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .sampling import check_sampling_args, process_logits, select_tokens


class TokenStreamer:
    """An iterator over generated tokens: pass it as ``generate(..., streamer=s)`` (run in a thread) and
    iterate over it in another; each item is a (batch,) tensor of the step's tokens."""

    _END = object()

    def __init__(self, timeout: Optional[float] = None):
        self._queue = queue.Queue()
        self.timeout = timeout

    def put(self, tokens: torch.Tensor):
        self._queue.put(tokens)

    def end(self):
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is self._END:
                return
            yield item


class _DecoderOnlyRun:
    """Prefill and decode steps of a decoder-only model over its KV cache."""

    def __init__(self, model, input_ids, attention_mask, max_len):
        B, _ = input_ids.shape
        self.model, self.input_ids = model, input_ids
        self.cache = model.new_cache(B, max_len)
        if attention_mask is None or bool(attention_mask.all()):
            self.mask, self.positions = None, None
            self.next_pos = torch.full((B, 1), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        else:  # left padding: positions count the real tokens only
            self.mask = attention_mask
            self.positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
            self.next_pos = attention_mask.long().sum(-1, keepdim=True)

    def prefill(self):
        return self.model(self.input_ids, attention_mask=self.mask, position_ids=self.positions, cache=self.cache,
                          last_only=True)

    def step(self, tokens):
        logits = self.model(tokens[:, None], position_ids=self.next_pos, cache=self.cache, last_only=True)
        self.next_pos += 1
        return logits

    def reorder(self, index):
        self.cache.reorder(index)
        self.next_pos = self.next_pos[index]


class _EncoderDecoderRun:
    """Encode once, then decode from the start token over a KV cache (cross-attention keys cached)."""

    def __init__(self, model, src_ids, src_mask, max_len, expand=1):
        self.model = model
        memory = model.encode(src_ids, src_mask)
        if expand > 1:
            memory = memory.repeat_interleave(expand, 0)
            src_mask = src_mask.repeat_interleave(expand, 0) if src_mask is not None else None
        self.memory, self.src_mask = memory, src_mask
        B = memory.shape[0]
        self.cache = model.new_cache(B, max_len)
        self.start = torch.full((B, 1), model.config.bos_token_id, dtype=torch.long, device=src_ids.device)

    def prefill(self):
        return self.step(self.start[:, 0])

    def step(self, tokens):
        return self.model.decode(tokens[:, None], self.memory, self.src_mask, cache=self.cache, last_only=True)

    def reorder(self, index):
        self.cache.reorder(index)


def _as_list(ids) -> Optional[list]:
    if ids is None:
        return None
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if isinstance(ids, int):
        ids = [ids]
    return [int(i) for i in ids]


def _check_inputs(model, input_ids, attention_mask, max_new_tokens, num_beams, streamer):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        got = f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise ValueError(f"generate: input_ids must be a (batch, length) int64 tensor; got {got}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids is empty (shape {tuple(input_ids.shape)})")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"generate: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                             f"got {tuple(attention_mask.shape)}")
        m = attention_mask.bool()
        if not bool(m.any(-1).all()):
            raise ValueError("generate: a row of attention_mask has no token (all zeros)")
        if not model.is_encoder_decoder and bool((m[:, :-1] & ~m[:, 1:]).any()):
            raise ValueError("generate: attention_mask has padding after a token; decoder-only prompts must be "
                             "left-padded (padding first)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    limit = getattr(model.config, "n_positions", None)
    learned = getattr(model.config, "positions", "learned") == "learned"
    if learned and limit is not None:
        need = (1 if model.is_encoder_decoder else input_ids.shape[1]) + max_new_tokens - 1  # the last is not fed
        if need > limit:
            raise ValueError(f"generate: {'the prompt' if not model.is_encoder_decoder else 'the start token'} and "
                             f"max_new_tokens={max_new_tokens} need {need} positions; the model has n_positions "
                             f"{limit}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"generate: num_beams must be a positive integer; got {num_beams!r}")
    if num_beams > 1 and streamer is not None:
        raise ValueError("generate: streaming is not available with beam search (num_beams > 1)")


def _steps(model, input_ids, attention_mask, *, max_new_tokens, do_sample=False, temperature=1.0, top_k=None,
           top_p=None, min_p=None, repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, generator=None,
           out=None):
    """Greedy or sampled decoding, one step at a time: yields each step's tokens (B,); the sequences so far
    are written to ``out[0]`` (prompt + new tokens, or start token + new tokens for encoder-decoders)."""
    cfg = model.config
    eos = _as_list(eos_token_id if eos_token_id is not None else getattr(cfg, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    B = input_ids.shape[0]
    device = input_ids.device
    if model.is_encoder_decoder:
        run = _EncoderDecoderRun(model, input_ids, attention_mask, max_new_tokens + 1)
        prompt = run.start
    else:
        prompt = input_ids
        run = _DecoderOnlyRun(model, input_ids, attention_mask, input_ids.shape[1] + max_new_tokens)
    P = prompt.shape[1]
    seqs = torch.empty(B, P + max_new_tokens, dtype=torch.long, device=device)
    seqs[:, :P] = prompt
    if out is not None:
        out.append(seqs)
    eos_t = torch.tensor(eos, device=device) if eos else None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    logits = run.prefill()
    for t in range(max_new_tokens):
        scores = process_logits(logits, seqs[:, :P + t], do_sample=do_sample, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        tokens = select_tokens(scores, do_sample, generator)
        if eos_t is not None:
            tokens = torch.where(unfinished, tokens, pad)
            unfinished &= ~torch.isin(tokens, eos_t)
        seqs[:, P + t] = tokens
        if out is not None:
            out[1:] = [P + t + 1]
        yield tokens
        if t + 1 == max_new_tokens or (eos_t is not None and not bool(unfinished.any())):
            return
        logits = run.step(tokens)


def _beam_search(model, input_ids, attention_mask, *, max_new_tokens, num_beams, length_penalty=1.0,
                 do_sample=False, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0,
                 eos_token_id=None, pad_token_id=None, generator=None):
    """Beam search with HuggingFace's scoring: the ``num_beams`` best running hypotheses grow by the best
    continuations of their summed log-probabilities; a hypothesis that ends (EOS or the length limit) is
    scored ``sum_logprobs / generated_length ** length_penalty`` and kept among the ``num_beams`` best
    finished ones; the search stops when no running beam can beat the worst finished one."""
    cfg = model.config
    K = num_beams
    eos = _as_list(eos_token_id if eos_token_id is not None else getattr(cfg, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    B = input_ids.shape[0]
    device = input_ids.device
    if model.is_encoder_decoder:
        run = _EncoderDecoderRun(model, input_ids, attention_mask, max_new_tokens + 1, expand=K)
        prompt = run.start[::K]
    else:
        prompt = input_ids
        mask = attention_mask.repeat_interleave(K, 0) if attention_mask is not None else None
        run = _DecoderOnlyRun(model, input_ids.repeat_interleave(K, 0), mask, input_ids.shape[1] + max_new_tokens)
    P = prompt.shape[1]
    L = P + max_new_tokens
    keep = max(2, 1 + len(eos or [])) * K
    eos_t = torch.tensor(eos, device=device) if eos else None

    running = torch.full((B, K, L), pad, dtype=torch.long, device=device)
    running[:, :, :P] = prompt[:, None]
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = -1e9
    done = running.clone()
    done_scores = torch.full((B, K), -1e9, device=device)
    done_flag = torch.zeros(B, K, dtype=torch.bool, device=device)
    done_len = torch.zeros(B, K, dtype=torch.long, device=device)
    first_k = torch.arange(keep, device=device) < K
    open_ = torch.ones(B, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * K

    logits = run.prefill()
    for t in range(max_new_tokens):
        cur = P + t
        logp = F.log_softmax(logits.float(), dim=-1)
        logp = process_logits(logp, running.view(B * K, L)[:, :cur], do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                              min_tokens_to_keep=1 + len(eos or [1]))
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        if do_sample:
            idx = torch.multinomial(F.softmax(acc, dim=-1), keep, generator=generator)
            top = acc.gather(1, idx)
        else:
            top, idx = acc.topk(keep, dim=1)
        src_beam, tok = idx // V, idx % V
        cand = running.gather(1, src_beam[:, :, None].expand(B, keep, L)).clone()
        cand[:, :, cur] = tok
        hits = torch.isin(tok, eos_t) if eos_t is not None else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= L:
            hits = torch.ones_like(hits)
        # the K best candidates that go on
        r_scores = top + hits.float() * -1e9
        nxt = r_scores.topk(K, dim=1).indices
        running = cand.gather(1, nxt[:, :, None].expand(B, K, L))
        running_scores = r_scores.gather(1, nxt)
        beam_src = src_beam.gather(1, nxt)
        # the K best finished hypotheses
        just = hits & first_k
        f_scores = top / float(cur + 1 - P) ** length_penalty
        f_scores = f_scores + (~open_).float() * -1e9 + (~just).float() * -1e9
        m_scores = torch.cat((done_scores, f_scores), 1)
        sel = m_scores.topk(K, dim=1).indices
        done = torch.cat((done, cand), 1).gather(1, sel[:, :, None].expand(B, K, L))
        done_scores = m_scores.gather(1, sel)
        done_flag = torch.cat((done_flag, just), 1).gather(1, sel)
        done_len = torch.cat((done_len, torch.full_like(tok, cur + 1 - P)), 1).gather(1, sel)
        # could a running beam still beat the worst finished one?
        best_possible = running_scores[:, :1] / float(cur + 1 - P) ** length_penalty
        worst_done = torch.where(done_flag, done_scores.min(1, keepdim=True).values, -1e9)
        open_ = open_ & (best_possible > worst_done).any(-1, keepdim=True)
        if not bool(open_.any()) or bool(hits.all()) or cur + 1 >= L:
            break
        run.reorder((beam_src + batch_offset).view(-1))
        logits = run.step(running[:, :, cur].reshape(-1))
    n = int(done_len[:, 0].max())
    return done[:, 0, :P + n]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, min_p: Optional[float] = None, repetition_penalty: float = 1.0,
             eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
             num_beams: int = 1, length_penalty: float = 1.0, generator: Optional[torch.Generator] = None,
             streamer=None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens for each prompt.

    Decoder-only models (``GPT``): ``input_ids`` (B, P) prompts, left-padded with ``attention_mask``
    (1 = token, 0 = padding); returns (B, P + n) prompts followed by the new tokens. Encoder-decoder models:
    ``input_ids`` are the source ids (``attention_mask`` its padding); returns (B, 1 + n) target sequences
    starting with the decoder start token. A sequence that produced ``eos_token_id`` (an int or a list;
    default the model config's) is padded with ``pad_token_id`` after it; generation stops when all have.
    ``do_sample`` draws from the processed distribution (``temperature``, ``top_k``, ``top_p``, ``min_p``),
    with ``generator`` for reproducible draws; ``num_beams > 1`` runs beam search (``length_penalty``).
    ``streamer``: an object with ``put(tokens)`` (each step's (B,) tokens) and ``end()``, e.g. a
    ``TokenStreamer``.
    """
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, num_beams, streamer)
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
              min_p=min_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
              generator=generator)
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            return _beam_search(model, input_ids, attention_mask, num_beams=num_beams, length_penalty=length_penalty,
                                **kw)
        out = []
        try:
            for tokens in _steps(model, input_ids, attention_mask, out=out, **kw):
                if streamer is not None:
                    streamer.put(tokens)
        finally:
            if streamer is not None:
                streamer.end()
        return out[0][:, :out[1]]
    finally:
        model.train(was_training)


def stream(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """As ``generate`` (without beam search), but returns an iterator that yields each step's tokens (B,)
    as soon as they are chosen. The arguments are checked at once."""
    if kwargs.pop("num_beams", 1) != 1:
        raise ValueError("stream: beam search (num_beams > 1) cannot stream")
    if "streamer" in kwargs:
        raise ValueError("stream: takes no streamer (it is one)")
    _check_inputs(model, input_ids, attention_mask, kwargs.get("max_new_tokens"), 1, None)
    check_sampling_args(kwargs.get("temperature", 1.0), kwargs.get("top_k"), kwargs.get("top_p"),
                        kwargs.get("min_p"), kwargs.get("repetition_penalty", 1.0))
    return _stream(model, input_ids, attention_mask, kwargs)


@torch.inference_mode()  # entered around each step only, not while the caller holds the iterator
def _stream(model, input_ids, attention_mask, kwargs):
    model.eval()
    yield from _steps(model, input_ids, attention_mask, **kwargs)

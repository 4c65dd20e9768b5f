"""Text generation: prefill the prompt into a preallocated KV cache, then one token per step, greedy
or sampled (temperature, top-k, top-p, min-p, repetition penalty), with per-sequence EOS, left-padded
batches and streaming; beam search is in fusedformer.beam. Decoder-only and encoder-decoder models.

``generate(model, input_ids, ...)`` returns the sequences; ``stream(model, input_ids, ...)`` yields
each step's tokens as they come; ``TokenStreamer`` is an iterator fed by ``generate(streamer=...)``
running in another thread. The logits processing follows HuggingFace transformers' order (repetition
penalty, then temperature, top-k, top-p, min-p), so that greedy decoding, and sampling with the same
random numbers, match it token for token.
"""

import queue
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch

from .beam import beam_search
from .sampling import check_sampling_args, process_logits, select_tokens


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
    ``TokenStreamer``. The model runs in eval mode and is put back in its mode afterwards.
    """
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, num_beams, streamer)
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    eos, pad = _eos_and_pad(model, eos_token_id, pad_token_id)
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, generator=generator)
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            run = _new_run(model, input_ids, attention_mask, max_new_tokens, copies=num_beams)
            return beam_search(run, max_new_tokens=max_new_tokens, num_beams=num_beams, eos=eos, pad=pad,
                               length_penalty=length_penalty, **sampling)
        new_tokens = []
        try:
            run = _new_run(model, input_ids, attention_mask, max_new_tokens)
            for tokens in _sample(run, eos, pad, max_new_tokens=max_new_tokens, **sampling):
                new_tokens.append(tokens)
                if streamer is not None:
                    streamer.put(tokens)
        finally:
            if streamer is not None:
                streamer.end()
        return torch.cat([run.prompt, torch.stack(new_tokens, 1)], 1)
    finally:
        model.train(was_training)


def stream(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """As ``generate`` (without beam search), but returns an iterator that yields each step's tokens (B,)
    as soon as they are chosen. The arguments are checked at once. The model runs in eval mode while
    the iterator runs, and is put back in its mode when the iterator is exhausted or closed."""
    if kwargs.pop("num_beams", 1) != 1:
        raise ValueError("stream: beam search (num_beams > 1) cannot stream")
    if "streamer" in kwargs:
        raise ValueError("stream: takes no streamer (it is one)")
    _check_inputs(model, input_ids, attention_mask, kwargs.get("max_new_tokens"), 1, None)
    check_sampling_args(kwargs.get("temperature", 1.0), kwargs.get("top_k"), kwargs.get("top_p"),
                        kwargs.get("min_p"), kwargs.get("repetition_penalty", 1.0))
    eos, pad = _eos_and_pad(model, kwargs.pop("eos_token_id", None), kwargs.pop("pad_token_id", None))
    return _stream(model, input_ids, attention_mask, eos, pad, kwargs)


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


@torch.inference_mode()  # entered around each step only, not while the caller holds the iterator
def _stream(model, input_ids, attention_mask, eos, pad, kwargs):
    # the finally runs when the iterator is exhausted, closed or collected
    was_training = model.training
    model.eval()
    try:
        run = _new_run(model, input_ids, attention_mask, kwargs["max_new_tokens"])
        yield from _sample(run, eos, pad, **kwargs)
    finally:
        model.train(was_training)


def _sample(run, eos: Optional[list], pad: int, *, max_new_tokens, do_sample=False, temperature=1.0, top_k=None,
            top_p=None, min_p=None, repetition_penalty=1.0, generator=None) -> Iterator[torch.Tensor]:
    """The sampling loop: yields the (B,) tokens of each step. A sequence that produced an EOS token
    gets ``pad`` from then on; the loop stops when every sequence has, or after max_new_tokens."""
    B, P = run.prompt.shape
    device = run.prompt.device
    seqs = torch.empty(B, P + max_new_tokens, dtype=torch.long, device=device)  # for the repetition penalty
    seqs[:, :P] = run.prompt
    eos_t = torch.tensor(eos, device=device) if eos else None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    logits = run.prefill()  # (B, V)
    for t in range(max_new_tokens):
        scores = process_logits(logits, seqs[:, :P + t], do_sample=do_sample, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        tokens = select_tokens(scores, do_sample, generator)  # (B,)
        if eos_t is not None:  # finished sequences get pad; a sequence finishes at its first EOS
            tokens = torch.where(unfinished, tokens, pad)
            unfinished &= ~torch.isin(tokens, eos_t)
        seqs[:, P + t] = tokens
        yield tokens
        if t + 1 == max_new_tokens or (eos_t is not None and not bool(unfinished.any())):
            return
        logits = run.step(tokens)


def _new_run(model, input_ids, attention_mask, max_new_tokens, copies=1):
    """The model's prefill / step / reorder over a KV cache for ``max_new_tokens`` new tokens."""
    cls = _EncoderDecoderRun if model.is_encoder_decoder else _DecoderOnlyRun
    return cls(model, input_ids, attention_mask, max_new_tokens, copies)


class _DecoderOnlyRun:
    """Prefill and decode steps of a decoder-only model over its KV cache. ``copies`` > 1 runs every
    prompt that many times, as consecutive rows (the beams of beam search)."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens, copies=1):
        self.model, self.prompt = model, input_ids  # prompt: (B, P), one row per prompt
        if copies > 1:
            input_ids = input_ids.repeat_interleave(copies, 0)
            attention_mask = attention_mask.repeat_interleave(copies, 0) if attention_mask is not None else None
        B, P = input_ids.shape
        self.input_ids = input_ids
        self.cache = model.new_cache(B, P + max_new_tokens)
        if attention_mask is None or bool(attention_mask.all()):
            self.mask, self.positions = None, None
            self.next_pos = torch.full((B, 1), P, dtype=torch.long, device=input_ids.device)
        else:  # left padding: positions count the real tokens only
            self.mask = attention_mask
            self.positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
            self.next_pos = attention_mask.long().sum(-1, keepdim=True)

    def prefill(self):
        """The logits (rows, V) at the last prompt position."""
        return self.model(self.input_ids, attention_mask=self.mask, position_ids=self.positions, cache=self.cache,
                          last_only=True)

    def step(self, tokens):
        """Feed one token per row (rows,); the logits (rows, V) of the next."""
        logits = self.model(tokens[:, None], position_ids=self.next_pos, cache=self.cache, last_only=True)
        self.next_pos += 1
        return logits

    def reorder(self, index):
        """Keep the rows ``index`` (beam search)."""
        self.cache.reorder(index)
        self.next_pos = self.next_pos[index]


class _EncoderDecoderRun:
    """Encode once, then decode from the start token over a KV cache (cross-attention keys cached).
    ``copies`` as for :class:`_DecoderOnlyRun`."""

    def __init__(self, model, src_ids, src_mask, max_new_tokens, copies=1):
        self.model = model
        memory = model.encode(src_ids, src_mask)  # (B, S, D)
        if copies > 1:
            memory = memory.repeat_interleave(copies, 0)
            src_mask = src_mask.repeat_interleave(copies, 0) if src_mask is not None else None
        self.memory, self.src_mask = memory, src_mask
        rows = memory.shape[0]
        self.cache = model.new_cache(rows, max_new_tokens + 1)
        self.start = torch.full((rows, 1), model.config.bos_token_id, dtype=torch.long, device=src_ids.device)
        self.prompt = self.start[::copies]  # (B, 1): the decoder start token of each source

    def prefill(self):
        return self.step(self.start[:, 0])

    def step(self, tokens):
        return self.model.decode(tokens[:, None], self.memory, self.src_mask, cache=self.cache, last_only=True)

    def reorder(self, index):
        self.cache.reorder(index)


def _eos_and_pad(model, eos_token_id, pad_token_id) -> Tuple[Optional[list], int]:
    """The EOS token ids (a list, or None: run to max_new_tokens) and the padding id written after a
    sequence's EOS: the arguments, else the model config's, else the first EOS id (or 0)."""
    cfg = model.config
    eos = _as_list(eos_token_id if eos_token_id is not None else getattr(cfg, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, pad


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

"""The engine: requests in, a step at a time (schedule, run the packed batch, sample, stop), outputs out;
and ``LLM``, the offline API over it (``LLM(model).generate(prompts, SamplingParams(...))``)."""

import itertools
from typing import Dict, List, Optional, Sequence as Seq, Union

import torch

from ..tokenizer import IncrementalText
from .block_pool import DEFAULT_BLOCK_SIZE, BlockPool, kv_block_bytes, num_blocks_for
from .kv_usage import KVCacheUsage
from .loader import load
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence, Status

Prompt = Union[str, List[int]]


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"LLM: {name} must be a positive integer; got {v!r}")
    return v


class LLMEngine:
    """Continuous batching over a paged KV cache for one GPT.

    Options: ``block_size`` (tokens per KV block, 16); the pool's size from ``kv_cache_memory`` (bytes)
    or ``kv_cache_fraction`` of the free memory (the CPU's available RAM, or the GPU's free memory;
    default 0.5, but never more blocks than ``max_num_seqs`` sequences of the full context take);
    ``max_num_seqs`` (256) and ``max_num_batched_tokens`` (2048) bound a step; ``enable_prefix_caching``
    (True); ``seed`` (0) for the draws of requests without their own seed.
    """

    def __init__(self, model, tokenizer=None, name="gpt", *, block_size: int = DEFAULT_BLOCK_SIZE,
                 kv_cache_memory: Optional[int] = None, kv_cache_fraction: Optional[float] = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 seed: int = 0):
        self.model, self.tokenizer, self.model_name = model, tokenizer, name
        c = model.config
        _positive_int("block_size", block_size)
        _positive_int("max_num_seqs", max_num_seqs)
        _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        self.max_model_len = c.n_positions
        self.eos_token_id = c.eos_token_id
        p = model.embed.weight
        block_bytes = kv_block_bytes(c.n_layer, c.n_kv_head, c.head_dim, block_size, p.element_size())
        if kv_cache_memory is not None:
            num_blocks = num_blocks_for(block_bytes, kv_cache_memory=kv_cache_memory)
        else:
            num_blocks = num_blocks_for(block_bytes, kv_cache_fraction=0.5 if kv_cache_fraction is None
                                        else kv_cache_fraction, free_memory=_free_memory(p.device))
            num_blocks = min(num_blocks, max_num_seqs * -(-self.max_model_len // block_size))
        self.pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens, enable_prefix_caching)
        self.runner = ModelRunner(model, num_blocks, block_size)
        self.kv_usage = KVCacheUsage(block_size)
        self.generator = torch.Generator(device=p.device).manual_seed(seed)
        self.requests: Dict[str, Request] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams; got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens exceed the model's context of {self.max_model_len}")
        vocab = self.model.config.vocab_size
        if any(i < 0 or i >= vocab for i in ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        longest = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if self.pool.blocks_for(longest) > self.pool.num_blocks:
            raise ValueError(f"prompt: a sequence of {longest} tokens needs {self.pool.blocks_for(longest)} KV blocks; "
                             f"the pool has {self.pool.num_blocks} (give more kv_cache_memory)")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"sampling_params: n={params.n} exceeds max_num_seqs {self.scheduler.max_num_seqs}")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        req = Request(request_id, text, ids, params, arrival=len(self.requests))
        seq = Sequence(next(self._seq_ids), req, 0, list(ids), self._generator(params, 0), fork_width=params.n)
        req.sequences.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return request_id

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> Dict[str, float]:
        """The KV pool's size (``kv_blocks_total``), the preemptions and prefix-cache blocks taken back so
        far, and how full the blocks in use are (:class:`KVCacheUsage`: the last step's utilization, the
        one at the step with the most blocks in use, the mean over steps)."""
        return {"kv_blocks_total": self.pool.num_blocks, "kv_block_size": self.pool.block_size,
                "num_preemptions": self.scheduler.num_preemptions, "prefix_cache_hit_blocks": self.pool.hits,
                **self.kv_usage.as_dict()}

    def step(self) -> List[RequestOutput]:
        """One model step; returns the requests that finished in it."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            raise RuntimeError("LLMEngine: nothing could be scheduled (a request larger than the KV pool)")
        logits, seqs = self.runner.execute(out)
        self.scheduler.computed(out)
        self.kv_usage.record(self.pool.num_used, self.scheduler.kv_tokens_held())
        rows, samplers = [], []
        for row, seq in enumerate(seqs):
            group = [seq] + self._fork(seq)
            rows += [row] * len(group)
            samplers += group
        chosen = sample(logits[rows] if len(rows) != len(seqs) else logits, samplers, self.eos_token_id,
                        self.generator)
        done = []
        for seq, s in zip(samplers, chosen):
            self._append(seq, s)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                if seq.request.finished:
                    done.append(self._output(self.requests.pop(seq.request.request_id)))
        return done

    def _fork(self, parent: Sequence) -> List[Sequence]:
        """The other samples of a request whose prompt was just computed."""
        req, children = parent.request, []
        for k in range(1, parent.fork_width):
            child = Sequence(next(self._seq_ids), req, k, list(parent.token_ids), self._generator(req.params, k))
            self.scheduler.fork(parent, child)
            req.sequences.append(child)
            children.append(child)
        parent.fork_width = 1
        return children

    def _generator(self, params: SamplingParams, index: int) -> Optional[torch.Generator]:
        if params.seed is None:
            return None
        seed = hash((params.seed, index)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator(device=self.runner.device).manual_seed(seed)

    def _append(self, seq: Sequence, s):
        p = seq.request.params
        seq.token_ids.append(s.token)
        seq.cumulative_logprob += s.logprob
        if s.top is not None:
            if seq.logprobs is None:
                seq.logprobs = []
            if self.tokenizer is not None:
                for t, lp in s.top.items():
                    lp.decoded_token = self.tokenizer.token_text(t)
            seq.logprobs.append(s.top)
        n_out = len(seq.token_ids) - seq.prompt_len
        stopped_by_token = n_out >= p.min_tokens and (
            (s.token == self.eos_token_id and not p.ignore_eos) or s.token in p.stop_token_ids)
        if stopped_by_token:
            seq.finish_reason = "stop"
            seq.stop_reason = s.token if s.token in p.stop_token_ids else None
        elif p.stop and n_out >= p.min_tokens and self.tokenizer is not None:
            if seq.detok is None:
                seq.detok = IncrementalText(self.tokenizer.decode)
            text = seq.detok.update(seq.output_ids)
            # only the text not searched yet can hold a match (which may start up to len(x) - 1 before it)
            hits = [(at, x) for x in p.stop if (at := text.find(x, max(0, seq.stop_searched - len(x) + 1))) >= 0]
            seq.stop_searched = len(text)
            if hits:
                at, x = min(hits)
                seq.text = text[:at]  # the stop string and what follows it are never part of the text
                seq.finish_reason, seq.stop_reason = "stop", x
                return
        if seq.finish_reason is None and (n_out == p.max_tokens or len(seq.token_ids) >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None and self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids[:-1] if stopped_by_token else seq.output_ids)

    def abort(self, request_ids):
        """End requests now, giving back every block their sequences hold."""
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.sequences:
                if seq.status is Status.RUNNING:
                    self.scheduler.finish(seq)
                elif seq.status is Status.WAITING:
                    self.scheduler.waiting.remove(seq)
                    seq.status = Status.FINISHED

    def snapshot(self, request_id: str) -> Optional[RequestOutput]:
        """The outputs so far of a request that has not ended (None if it has): token ids, log-probabilities
        and the samples forked so far grow step by step; ``text`` is set when a sample finishes."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        out = self._output(req)
        for c in out.outputs:  # copies: the engine goes on appending to its own lists
            c.logprobs = list(c.logprobs) if c.logprobs is not None else None
        return out

    def _output(self, req: Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, s.output_ids, s.cumulative_logprob, s.logprobs, s.finish_reason,
                                 s.stop_reason) for s in sorted(req.sequences, key=lambda s: s.index)]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             all(s.status is Status.FINISHED for s in req.sequences), req.num_cached_tokens or 0)

    def _tokenize(self, prompt: Prompt):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; give token ids or LLM(tokenizer=...)")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise ValueError("prompt: the text has no token")
            return prompt, ids
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not prompt or \
                not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompt: must be a string or a non-empty list of token ids; got {prompt!r:.80}")
        return None, list(prompt)


class LLM:
    """Offline batched generation with continuous batching over a paged KV cache.

    ``model``: a ``fusedformer.models.GPT``, a fusedformer checkpoint folder (default: the shipped model)
    or a HuggingFace GPT-2 / Llama checkpoint folder; ``tokenizer``: a tokenizer or tokenizer.json path
    (default: the checkpoint's); ``dtype``: "auto" (the checkpoint's) or a floating dtype. The other
    options are :class:`LLMEngine`'s.
    """

    def __init__(self, model=None, tokenizer=None, dtype="auto", **engine_options):
        gpt, tok, name = load(model, tokenizer, dtype)
        self.engine = LLMEngine(gpt, tok, name, **engine_options)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[Prompt, Seq[Prompt]], sampling_params: Union[SamplingParams, Seq[SamplingParams],
                 None] = None, use_tqdm: bool = True) -> List[RequestOutput]:
        """One RequestOutput per prompt, in order. ``prompts``: a string, a list of token ids, or a list
        of either; ``sampling_params``: one for all or one per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: {len(sampling_params)} given for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p))
        except Exception:
            self._abort(ids)
            raise
        results = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
        try:
            while len(results) < len(ids):
                for r in engine.step():
                    results[r.request_id] = r
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            self._abort([i for i in ids if i not in results])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    def _abort(self, request_ids):
        self.engine.abort(request_ids)

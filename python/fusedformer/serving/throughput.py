"""Continuous batching against static batching on one workload: requests with prompt and output
lengths drawn at random (fixed seed, EOS ignored), generated greedily by ``LLM.generate`` and by
``fusedformer.generate`` in static batches (left-padded prompts, every row run to its batch's longest
output, as a user would write it). Only the tokens each request asked for count. Used by the demo and
by ``bench/bench_serving.py``."""

import time
from typing import Dict, List, Tuple

import torch

Request = Tuple[List[int], int]  # (prompt token ids, output tokens wanted)


def random_workload(n: int, lo: int, hi: int, context: int, vocab: int, seed: int = 0) -> List[Request]:
    """``n`` requests whose prompt and output lengths are drawn from [lo, hi], clipped so that prompt
    + output fit ``context`` (the prompt to half of it)."""
    if n < 1 or lo < 1 or hi < lo:
        raise ValueError(f"random_workload: need n >= 1 and 1 <= lo <= hi, got n={n}, lo={lo}, hi={hi}")
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        p = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), context // 2)
        o = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), context - p)
        reqs.append((torch.randint(1, vocab, (p,), generator=g).tolist(), o))
    return reqs


def static_batches(model, reqs: List[Request], batch: int = 8) -> List[List[int]]:
    """Greedy outputs of ``fusedformer.generate`` over ``reqs`` in batches of ``batch``."""
    from ..generation import generate

    outs = []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        P = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), P, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        seqs = generate(model, ids, mask, max_new_tokens=max(o for _, o in chunk), eos_token_id=[])
        outs += [seqs[r, P:P + o].tolist() for r, (_, o) in enumerate(chunk)]
    return outs


def hf_static_batches(hf_model, reqs: List[Request], batch: int = 8, pad_token_id: int = 0) -> List[List[int]]:
    """Greedy outputs of a HuggingFace model's ``generate`` over ``reqs`` in left-padded batches of
    ``batch`` (what a user of transformers writes)."""
    outs = []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        P = max(len(p) for p, _ in chunk)
        ids = torch.full((len(chunk), P), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        m = max(o for _, o in chunk)
        with torch.no_grad():
            seqs = hf_model.generate(ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m, do_sample=False,
                                     pad_token_id=pad_token_id)
        outs += [seqs[r, P:P + o].tolist() for r, (_, o) in enumerate(chunk)]
    return outs


def engine_outputs(llm, reqs: List[Request]) -> List[List[int]]:
    """Greedy outputs of ``llm.generate`` over ``reqs``, all submitted at once."""
    from .sampling_params import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    return [list(o.outputs[0].token_ids) for o in llm.generate([p for p, _ in reqs], params, use_tqdm=False)]


def compare(llm, reqs: List[Request], batch: int = 8, validate: int = 4) -> Dict[str, float]:
    """Checks that both give the same greedy tokens on the first ``validate`` requests, then times one
    run of each over ``reqs``: output tokens/s of each and their ratio, and how full the engine's KV
    blocks in use were in its run (at the step with the most blocks in use, and the mean over steps)."""
    model = llm.engine.model
    check = reqs[:validate]
    if validate and engine_outputs(llm, check) != static_batches(model, check, batch):
        raise AssertionError("LLM.generate and fusedformer.generate gave different greedy tokens")
    tokens = sum(o for _, o in reqs)
    llm.engine.kv_usage.reset()  # the KV figures of the timed run alone
    t0 = time.perf_counter()
    engine_outputs(llm, reqs)
    t_engine = time.perf_counter() - t0
    kv = llm.engine.kv_usage
    t0 = time.perf_counter()
    static_batches(model, reqs, batch)
    t_static = time.perf_counter() - t0
    return {"requests": len(reqs), "output_tokens": tokens, "llm_generate_tok_s": tokens / t_engine,
            f"static_batch{batch}_tok_s": tokens / t_static, "ratio": t_static / t_engine,
            "kv_peak_blocks_in_use": kv.peak_blocks_in_use, "kv_utilization_at_peak": kv.utilization_at_peak,
            "kv_mean_utilization": kv.mean_utilization}

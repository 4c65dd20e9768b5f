"""Offline serving throughput: ``fusedformer.LLM.generate`` (continuous batching, paged KV cache) against
``fusedformer.generate`` in static batches of 8 (left-padded prompts, every row run to its batch's
longest output, as a user would write it), on one workload of requests with prompt and output lengths
drawn from [min_len, max_len] (fixed seed, EOS ignored). Only the tokens each request asked for count.

Validates first (greedy output of both equal on the first requests), then times one run of each.
Usage: python bench/bench_serving.py [--requests 64] [--min-len 16] [--max-len 512] [--model DIR]
(lengths are clipped so that prompt + output fit the model's context).
"""

import argparse
import json
import os
import platform
import time

import torch

import fusedformer
from fusedformer.serving import LLM, SamplingParams


def workload(n, lo, hi, context, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        p = int(torch.randint(lo, hi + 1, (1,), generator=g))
        o = int(torch.randint(lo, hi + 1, (1,), generator=g))
        p = min(p, context // 2)
        o = min(o, context - p)
        reqs.append((torch.randint(1, vocab, (p,), generator=g).tolist(), o))
    return reqs


def static_batches(model, reqs, batch=8):
    outs = []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        P = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), P, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (p, _) in enumerate(chunk):
            ids[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        m = max(o for _, o in chunk)
        seqs = fusedformer.generate(model, ids, mask, max_new_tokens=m, eos_token_id=[])
        outs += [seqs[r, P:P + o].tolist() for r, (_, o) in enumerate(chunk)]
    return outs


def engine_run(llm, reqs):
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    return [o.outputs[0].token_ids for o in llm.generate([p for p, _ in reqs], params, use_tqdm=False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--validate", type=int, default=4, help="requests checked for equal greedy output first")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serving.json"))
    args = ap.parse_args()
    llm = LLM(args.model, max_num_seqs=64, max_num_batched_tokens=1024)
    model = llm.engine.model
    c = model.config
    reqs = workload(args.requests, args.min_len, args.max_len, c.n_positions, c.vocab_size)
    check = reqs[:args.validate]
    if engine_run(llm, check) != static_batches(model, check):
        raise SystemExit("validation failed: LLM.generate and fusedformer.generate differ")
    tokens = sum(o for _, o in reqs)
    t0 = time.perf_counter()
    engine_run(llm, reqs)
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()
    static_batches(model, reqs)
    t_static = time.perf_counter() - t0
    result = {
        "model": args.model or "shipped", "requests": len(reqs), "output_tokens": tokens,
        "llm_generate_tok_s": tokens / t_engine, "static_batch8_tok_s": tokens / t_static,
        "ratio": t_static / t_engine, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

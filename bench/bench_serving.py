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

from fusedformer.serving import LLM
from fusedformer.serving.throughput import compare, random_workload


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
    c = llm.engine.model.config
    reqs = random_workload(args.requests, args.min_len, args.max_len, c.n_positions, c.vocab_size)
    try:
        result = compare(llm, reqs, batch=8, validate=args.validate)
    except AssertionError as e:
        raise SystemExit(f"validation failed: {e}")
    result.update({
        "model": args.model or "shipped", "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    })
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

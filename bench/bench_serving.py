"""Offline serving throughput: ``fusedformer.LLM.generate`` (continuous batching, paged KV cache) against
``fusedformer.generate`` in static batches of 8 (left-padded prompts, every row run to its batch's
longest output, as a user would write it), on one workload of requests with prompt and output lengths
drawn from [min_len, max_len] (fixed seed, EOS ignored). Only the tokens each request asked for count.

Validates first (greedy output of both equal on the first requests), then times one run of each. Also
reports how full the engine's KV blocks in use were in its run: tokens held / (blocks in use x block
size) at the step with the most blocks in use (``kv_utilization_at_peak``) and the mean over steps.
With --gpt2-small, the model is a GPT-2-small shape (12 layers, 768 wide, random weights) in --dtype,
and HuggingFace ``generate`` in static batches of 8 on the same weights is timed too (its greedy
tokens checked against ours first).
Usage: python bench/bench_serving.py [--requests 64] [--min-len 16] [--max-len 512] [--model DIR]
       [--gpt2-small --dtype float32|bfloat16] [--out FILE]
Writes bench/results/cpu-serving[-gpt2-small]-DTYPE.json (machine, commit and tree state recorded);
bench/report.py renders it with ``render``.
(lengths are clipped so that prompt + output fit the model's context).
"""

import argparse
import copy
import json
import os
import sys
import time

import torch

from fusedformer.serving import LLM
from fusedformer.serving.throughput import (compare, engine_outputs, hf_static_batches, random_workload,
                                             static_batches)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info  # noqa: E402


def gpt2_small_hf(dtype=torch.float32):
    """A HuggingFace GPT-2 of GPT-2 small's shape (12 layers, 768 wide, 1024 positions) with random
    weights (seed 0), in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_positions=1024)).eval().to(dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--validate", type=int, default=4, help="requests checked for equal greedy output first")
    ap.add_argument("--out", default=None, help="result file (default bench/results/cpu-serving[-gpt2-small]-DTYPE.json)")
    ap.add_argument("--gpt2-small", action="store_true", help="a GPT-2-small shape with random weights, HF as a peer")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    hf = None
    if args.gpt2_small:
        from fusedformer.models import GPT

        hf = gpt2_small_hf(dtype)
        model = GPT.from_hf(hf).to(dtype).eval()
        llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=1024)
    else:
        llm = LLM(args.model, max_num_seqs=64, max_num_batched_tokens=1024)
    c = llm.engine.model.config
    reqs = random_workload(args.requests, args.min_len, args.max_len, c.n_positions, c.vocab_size)
    check = reqs[:args.validate]
    validate = args.validate
    agreement = None
    if dtype != torch.float32:
        # bfloat16 rounds differently in a packed batch than in a static one, so greedy tokens part
        # where two logits are near-equal: the engine is checked for equal tokens on the same weights in
        # float32, and the bf16 agreement (tokens equal before the first difference) is reported
        m32 = copy.deepcopy(llm.engine.model).float()
        if engine_outputs(LLM(m32, max_num_seqs=64, max_num_batched_tokens=1024), check) != static_batches(m32, check, 8):
            raise SystemExit("validation failed: LLM.generate and fusedformer.generate gave different greedy tokens "
                             "(float32 copy of the weights)")
        ours, static = engine_outputs(llm, check), static_batches(llm.engine.model, check, 8)
        same = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ours, static))
        agreement = f"{same} of {sum(len(x) for x in ours)}"
        validate = 0
    try:
        result = compare(llm, reqs, batch=8, validate=validate)
    except AssertionError as e:
        raise SystemExit(f"validation failed: {e}")
    if agreement is not None:
        result["validated"] = "greedy tokens equal on a float32 copy of the weights"
        result["bf16_tokens_equal_to_static_before_first_difference"] = agreement
    if hf is not None:
        ours = static_batches(llm.engine.model, check, 8)
        theirs = hf_static_batches(hf, check, 8)
        agree = sum(a == b for a, b in zip(ours, theirs))
        t0 = time.perf_counter()
        hf_static_batches(hf, reqs, 8)
        t_hf = time.perf_counter() - t0
        result.update({"hf_static_batch8_tok_s": result["output_tokens"] / t_hf,
                       "ratio_vs_hf": result["llm_generate_tok_s"] * t_hf / result["output_tokens"],
                       "hf_same_greedy_tokens": f"{agree} of {len(check)}"})
    result.update({
        "model": "gpt2-small shape, random weights" if args.gpt2_small else (args.model or "shipped"),
        "dtype": args.dtype, "min_len": args.min_len, "max_len": args.max_len, "machine": machine_info("cpu"),
    })
    print(json.dumps(result, indent=1))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"cpu-serving{'-gpt2-small' if args.gpt2_small else ''}-{args.dtype}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(render(result))


def render(r):
    """The result as Markdown (bench/report.py's summary block)."""
    lines = [f"{r['requests']} requests, prompt and output lengths drawn from {r['min_len']}-{r['max_len']} tokens "
             f"(fixed seed, EOS ignored), {r['model']}, {r['dtype']}; {r['output_tokens']} output tokens.", "",
             "| run | output tokens/s | LLM.generate against it |", "|---|---|---|",
             f"| `LLM.generate` (continuous batching, paged KV cache) | {r['llm_generate_tok_s']:.1f} | |",
             f"| `fusedformer.generate`, static batches of 8 | {r['static_batch8_tok_s']:.1f} | {r['ratio']:.2f}x |"]
    if "hf_static_batch8_tok_s" in r:
        lines.append(f"| HF `generate`, static batches of 8 | {r['hf_static_batch8_tok_s']:.1f} | {r['ratio_vs_hf']:.2f}x |")
    lines += ["", f"KV cache: {r['kv_peak_blocks_in_use']} blocks in use at the peak, "
              f"{100 * r['kv_utilization_at_peak']:.1f}% of their slots holding tokens there, "
              f"{100 * r['kv_mean_utilization']:.1f}% on average over the steps."]
    if "validated" in r:
        lines.append(f"Validation: {r['validated']}; in {r['dtype']}, the engine's greedy tokens equal the static "
                     f"batches' before their first difference on {r['bf16_tokens_equal_to_static_before_first_difference']} "
                     f"tokens of the requests checked.")
    if "hf_same_greedy_tokens" in r:
        lines.append(f"HF's greedy tokens equal ours on {r['hf_same_greedy_tokens']} requests checked.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

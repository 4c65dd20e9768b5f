"""The server under load: ``python -m fusedformer serve`` in a subprocess, driven by the ``openai`` async
client with streamed completion requests that arrive as a Poisson process (exponential inter-arrival
times, fixed seed) at each rate of a sweep.

Each request has a prompt of random token ids and an output length drawn from [min_len, max_len]
(``serving.throughput.random_workload``, clipped to the model's context; a fresh seed per rate, so that
no rate takes another's prompts back from the prefix cache), asks for greedy decoding with EOS ignored,
and records its time to first token (TTFT: from sending the request to its first streamed token), its
time per output token after the first (TPOT: from the first token to the last, over the tokens after
the first) and its output tokens. A rate's requests are checked before it is reported: every one
answered without error, finished by length with exactly the tokens asked for (``usage``); a rate that
fails is reported as failed, with no figures, and the run exits with status 1. Per rate: p50/p99 TTFT
and TPOT, output tokens/s (all its output tokens over the time from its first request to its last
answer) and the requests/s achieved; the rate the server holds is the highest of the sweep whose p99
TTFT is under --slo-ttft seconds (2). Last, the server's KV-cache figures from /metrics: the most
blocks in use at a step and how full they were (tokens held / slots of the blocks in use) at that step
and on average over the sweep.

A rate runs rate x --duration requests, at least --min-requests and at most --max-requests (which bounds
the time an overloaded rate takes to drain).

With --gpt2-small and --llama-cpp-src (the llama.cpp tree vendored in the llama-cpp-python sdist), the
same sweep (the same requests: the same seeds) then runs against llama.cpp's own ``llama-server``,
built from that tree with CMake, on the same weights converted by its convert_hf_to_gguf.py to an f32
GGUF, with --llama-slots parallel slots sharing one KV buffer and continuous batching; each rate is
checked the same way, and the two servers are set side by side (output tokens/s, p99 TTFT). Where it
cannot be built or converted, the peer is skipped with a note.

Writes bench/results/cpu-serving-load.{json,md} (--gpt2-small: cpu-serving-load-gpt2-small; with
--quick: build/bench-quick/, a short sweep that checks the whole path in under a minute).

    python bench/bench_serving_load.py [--quick] [--rates 2,4,8,16,32] [--duration 40] [--min-requests 10]
        [--max-requests 200] [--min-len 16] [--max-len 128] [--model DIR | --gpt2-small] [--dtype auto|float32|bfloat16]
        [--max-num-seqs N] [--max-num-batched-tokens N] [--kv-cache-memory BYTES] [--seed 0] [--out DIR]
        [--llama-cpp-src DIR] [--llama-slots 32]
"""

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine_info  # noqa: E402

SUITE = "serving-load"
STEM = "cpu-serving-load"
GAUGES = ("fusedformer_kv_blocks_total", "fusedformer_kv_peak_blocks_in_use", "fusedformer_kv_utilization_at_peak",
          "fusedformer_kv_utilization_mean")


def percentile(xs, q):
    """The ``q``-th percentile of ``xs``, interpolated linearly between the closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def poisson_arrivals(n, rate, seed):
    """Send times (seconds from the start) of ``n`` requests arriving at ``rate`` per second on average."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def gauges(url):
    """The server's KV-cache gauges from /metrics (fusedformer's own server only)."""
    from fusedformer.serving.process import metrics

    return {name.removeprefix("fusedformer_"): value for name, value in metrics(url).items() if name in GAUGES}


def llama_server_binary(src, build_dir):
    """llama.cpp's ``llama-server`` built with CMake from the source tree ``src`` into ``build_dir``
    (an existing build is brought up to date, which takes seconds): its path, or why it could not be
    built."""
    import shutil

    cmake = os.path.join(os.path.dirname(sys.executable), "cmake")
    cmake = cmake if os.path.exists(cmake) else shutil.which("cmake")
    if cmake is None:
        return None, "no cmake"
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
             "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON"]
    for cmd in ([cmake, "-S", src, "-B", build_dir, *flags],
                [cmake, "--build", build_dir, "--target", "llama-server", "-j", str(os.cpu_count() or 1)]):
        print("$ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return None, ((r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"])[0][:200]
    path = os.path.join(build_dir, "bin", "llama-server")
    return (path, None) if os.path.exists(path) else (None, f"no {path} after the build")


def start_llama_server(binary, gguf, slots, context, log_path):
    """``llama-server`` on the GGUF with ``slots`` parallel slots sharing one KV buffer of ``slots`` x
    ``context`` tokens (continuous batching is its default), all cores for decoding and prefill."""
    from fusedformer.serving.process import ServerProcess, free_port

    port, threads = free_port(), str(os.cpu_count() or 1)
    options = ["--parallel", str(slots), "--kv-unified", "--ctx-size", str(slots * context), "--threads", threads,
               "--threads-batch", threads, "--cont-batching"]
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--no-webui", *options]
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", log_path, timeout=300), " ".join(options)


async def one_request(client, model, prompt, n_out, send_at, t0):
    """One streamed completion sent at ``t0 + send_at``: its timings, output tokens and finish reason,
    or the error it met."""
    await asyncio.sleep(max(0.0, t0 + send_at - time.perf_counter()))
    start = time.perf_counter()
    rec = {"prompt_tokens": len(prompt), "max_tokens": n_out, "lag": start - t0 - send_at}
    first = last = usage = finish = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=n_out, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                first = first if first is not None else now
                last = now
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as e:  # reported by the validation
        rec["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return rec
    rec.update(finish_reason=finish, end=time.perf_counter() - t0, start=start - t0,
               output_tokens=usage.completion_tokens if usage is not None else None,
               usage_prompt_tokens=usage.prompt_tokens if usage is not None else None)
    if first is not None:
        rec["ttft"] = first - start
        if n_out > 1:
            rec["tpot"] = (last - first) / (n_out - 1)
    return rec


def check(records):
    """The problems of a rate's requests (empty: every one answered in full)."""
    problems = []
    for i, r in enumerate(records):
        if "error" in r:
            problems.append(f"request {i}: {r['error']}")
        elif r["output_tokens"] != r["max_tokens"] or r["finish_reason"] != "length" or "ttft" not in r:
            problems.append(f"request {i}: {r['output_tokens']} tokens of {r['max_tokens']}, finish reason "
                            f"{r['finish_reason']!r}")
        elif r["usage_prompt_tokens"] != r["prompt_tokens"]:
            problems.append(f"request {i}: usage counts {r['usage_prompt_tokens']} prompt tokens of "
                            f"{r['prompt_tokens']}")
    return problems


async def run_rate(url, model, reqs, rate, seed):
    """Send ``reqs`` at ``rate`` requests/s (Poisson arrivals) and wait for every answer."""
    import httpx
    import openai

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                                 timeout=httpx.Timeout(600.0)) as http:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http)
        send = poisson_arrivals(len(reqs), rate, seed)
        t0 = time.perf_counter()
        return await asyncio.gather(*(one_request(client, model, p, n, at, t0) for (p, n), at in zip(reqs, send)))


def summarize(rate, records, slo):
    row = {"rate": rate, "requests": len(records)}
    problems = check(records)
    if problems:
        row["failed"] = f"{len(problems)} of {len(records)} requests: " + "; ".join(problems[:3])
        return row
    ttft = [r["ttft"] for r in records]
    tpot = [r["tpot"] for r in records if "tpot" in r]
    tokens = sum(r["output_tokens"] for r in records)
    span = max(r["end"] for r in records) - min(r["start"] for r in records)
    row.update(prompt_tokens=sum(r["prompt_tokens"] for r in records), output_tokens=tokens,
               seconds=span, output_tok_s=tokens / span, achieved_req_s=len(records) / span,
               ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99), ttft_max_s=max(ttft),
               tpot_p50_ms=1e3 * percentile(tpot, 50), tpot_p99_ms=1e3 * percentile(tpot, 99),
               max_send_lag_s=max(r["lag"] for r in records))
    row["holds"] = row["ttft_p99_s"] < slo
    return row


def held_rate(rows):
    held = [r["rate"] for r in rows if r.get("holds")]
    return max(held) if held else None


def sweep(url, model, context, vocab, rates, opts):
    """Warm-up requests, then every rate of the sweep against the server at ``url``: the rows."""
    from fusedformer.serving.throughput import random_workload

    warm = random_workload(4, opts.min_len, opts.max_len, context, vocab, seed=opts.seed + 1000)
    problems = check(asyncio.run(run_rate(url, model, warm, 100.0, 0)))
    if problems:
        raise SystemExit("the warm-up requests failed: " + "; ".join(problems[:3]))
    rows = []
    for k, rate in enumerate(rates):
        n = min(opts.max_requests, max(opts.min_requests, round(rate * opts.duration)))
        reqs = random_workload(n, opts.min_len, opts.max_len, context, vocab, seed=opts.seed + k)
        row = summarize(rate, asyncio.run(run_rate(url, model, reqs, rate, opts.seed + k)), opts.slo_ttft)
        rows.append(row)
        if row.get("failed"):
            print(f"rate {rate:g}: FAILED validation: {row['failed']}", flush=True)
        else:
            print(f"rate {rate:g} req/s, {n} requests: TTFT p50 {row['ttft_p50_s']:.3f} s p99 "
                  f"{row['ttft_p99_s']:.3f} s, TPOT p50 {row['tpot_p50_ms']:.1f} ms p99 "
                  f"{row['tpot_p99_ms']:.1f} ms, {row['output_tok_s']:.1f} output tok/s", flush=True)
    return rows


def _rate_rows(results, slo):
    lines = [f"| rate (req/s) | requests | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) | "
             f"output tok/s | achieved req/s | p99 TTFT < {slo:g} s |", "|" + "---|" * 9]
    for r in results:
        if r.get("failed"):
            lines.append(f"| {r['rate']:g} | {r['requests']} | FAILED validation: {r['failed'].replace('|', '/')} "
                         "|  |  |  |  |  |  |")
            continue
        lines.append(f"| {r['rate']:g} | {r['requests']} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | "
                     f"{r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} | {r['output_tok_s']:.1f} | "
                     f"{r['achieved_req_s']:.2f} | {'yes' if r['holds'] else 'no'} |")
    return lines


def _held_line(results, held, slo):
    top = held is not None and held == max(r["rate"] for r in results)
    return (f"Rate held (the highest of the sweep with p99 TTFT < {slo:g} s): "
            + (f"{held:g} req/s" + (", the top of the sweep: the limit lies higher." if top else ".")
               if held is not None else "none of the sweep."))


def _side_by_side(ours, peer, name):
    """Per rate: output tok/s and p99 TTFT of both servers, their ratios, and the goals: ahead in p99
    TTFT at every rate, and in output tok/s at the top rate (below saturation both deliver the tokens
    asked for, so tok/s compares servers only where they fall behind the rate sent)."""
    lines = [f"| rate (req/s) | output tok/s: ours | {name} | ratio | p99 TTFT (s): ours | {name} | ratio |",
             "|" + "---|" * 7]
    theirs = {r["rate"]: r for r in peer}
    tok, ttft = {}, {}
    for r in ours:
        p = theirs.get(r["rate"])
        if p is None or r.get("failed") or p.get("failed"):
            continue
        tok[r["rate"]], ttft[r["rate"]] = r["output_tok_s"] / p["output_tok_s"], p["ttft_p99_s"] / r["ttft_p99_s"]
        lines.append(f"| {r['rate']:g} | {r['output_tok_s']:.1f} | {p['output_tok_s']:.1f} | {tok[r['rate']]:.2f}x | "
                     f"{r['ttft_p99_s']:.3f} | {p['ttft_p99_s']:.3f} | {ttft[r['rate']]:.2f}x |")
    lines += ["", f"Ratios: ours over {name} in output tok/s, {name}'s p99 TTFT over ours (above 1: ours ahead)."]
    if tok:
        top = max(tok)
        lines.append(f"Goals: output tok/s at the top rate ({top:g} req/s) {tok[top]:.2f}x: "
                     f"{'met' if tok[top] >= 1.0 else 'MISSED'}; p99 TTFT ahead at every rate: "
                     f"{'met' if all(v >= 1.0 for v in ttft.values()) else 'MISSED'} "
                     f"({sum(v >= 1.0 for v in ttft.values())} of {len(ttft)} rates).")
    return lines


def render(data):
    """The Markdown of a result: the workload, one row per rate, the rate held and the KV-cache figures;
    with a peer server, its rows and the two side by side."""
    c, slo = data["config"], data["config"]["slo_ttft_s"]
    lines = [f"Model: {c['model']} ({c['dtype']}), server options: {c['server_args'] or 'the defaults'}. "
             f"Prompt and output lengths uniform in [{c['min_len']}, {c['max_len']}] tokens (clipped to the "
             f"context of {c['context']}), greedy, EOS ignored; Poisson arrivals, seed {c['seed']}; a rate runs "
             f"rate x {c['duration_s']:g} s requests, at least {c['min_requests']} and at most "
             f"{c['max_requests']}. TTFT from sending a request to its first streamed token; TPOT from the "
             "first token to the last, per token after the first; p99 over fewer than 100 requests "
             "interpolates between the slowest two. Output tok/s: a rate's output tokens over the time from "
             "its first request to its last answer.", ""]
    lines += _rate_rows(data["results"], slo)
    lines += ["", _held_line(data["results"], data.get("held_rate"), slo)]
    kv = data.get("kv")
    if kv:
        lines.append(f"KV cache over the sweep: at most {kv['kv_peak_blocks_in_use']:.0f} of "
                     f"{kv['kv_blocks_total']:.0f} blocks in use at a step, holding "
                     f"{100 * kv['kv_utilization_at_peak']:.1f}% of their token slots at that step; "
                     f"{100 * kv['kv_utilization_mean']:.1f}% on average over the steps.")
    for name, peer in data.get("peers", {}).items():
        lines += ["", f"**{name}**, the same requests (same seeds), run after ours on the same weights, "
                  f"options: {peer['server_args']}.", ""]
        lines += _rate_rows(peer["results"], slo)
        lines += ["", _held_line(peer["results"], peer.get("held_rate"), slo), ""]
        lines += _side_by_side(data["results"], peer["results"], name)
    for note in data.get("skipped", []):
        lines += ["", f"Skipped: {note}."]
    return "\n".join(lines) + "\n"


def _vocab_size(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["vocab_size"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two short rates, short sequences (a smoke run)")
    ap.add_argument("--rates", default=None, help="comma-separated request rates per second (default 2,4,8,16,32)")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate (default 40)")
    ap.add_argument("--min-requests", type=int, default=None, help="requests per rate at least (default 10)")
    ap.add_argument("--max-requests", type=int, default=None, help="requests per rate at most (default 200)")
    ap.add_argument("--min-len", type=int, default=None, help="shortest prompt and output (default 16)")
    ap.add_argument("--max-len", type=int, default=None, help="longest prompt and output (default 128)")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="the p99 TTFT a rate must stay under to be held")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--gpt2-small", action="store_true",
                    help="a GPT-2-small-shaped HuggingFace checkpoint with random weights (token-id prompts only)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="the server's --dtype")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-memory", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama-cpp-src", default=None,
                    help="a llama.cpp source tree (vendor/llama.cpp of the llama-cpp-python sdist): with --gpt2-small, "
                         "the same sweep against its llama-server, built with CMake, on the same weights in f32")
    ap.add_argument("--llama-slots", type=int, default=32, help="llama-server's parallel slots (default 32)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results, or build/bench-quick)")
    ap.add_argument("--stem", default=None, help="file name of the result (default cpu-serving-load, with "
                                                  "--gpt2-small cpu-serving-load-gpt2-small)")
    args = ap.parse_args(argv)
    q = args.quick
    rates = [float(x) for x in (args.rates or ("1,4" if q else "2,4,8,16,32")).split(",") if x.strip()]
    args.duration = args.duration if args.duration is not None else (4.0 if q else 40.0)
    args.min_requests = args.min_requests if args.min_requests is not None else (4 if q else 10)
    args.max_requests = args.max_requests if args.max_requests is not None else (16 if q else 200)
    args.min_len = args.min_len if args.min_len is not None else (8 if q else 16)
    args.max_len = args.max_len if args.max_len is not None else (32 if q else 128)
    if not rates or any(r <= 0 for r in rates):
        ap.error(f"--rates: positive request rates needed, got {args.rates!r}")
    if args.duration <= 0 or not 1 <= args.min_requests <= args.max_requests or \
            not 1 <= args.min_len <= args.max_len or args.slo_ttft <= 0:
        ap.error("--duration and --slo-ttft must be positive, 1 <= --min-requests <= --max-requests, "
                 "1 <= --min-len <= --max-len")
    if args.gpt2_small and args.model:
        ap.error("--gpt2-small and --model name two models; give one")
    if args.llama_cpp_src and not args.gpt2_small:
        ap.error("--llama-cpp-src: the llama-server peer runs on the --gpt2-small weights; add --gpt2-small")
    if args.llama_cpp_src and not os.path.exists(os.path.join(args.llama_cpp_src, "convert_hf_to_gguf.py")):
        ap.error(f"--llama-cpp-src: {args.llama_cpp_src} holds no convert_hf_to_gguf.py (give the llama.cpp tree)")
    if args.llama_slots < 1:
        ap.error(f"--llama-slots must be at least 1, got {args.llama_slots}")
    stem = args.stem or (STEM + "-gpt2-small" if args.gpt2_small else STEM)

    from fusedformer.serving.process import start_server
    from fusedformer.textgen import SHIPPED_MODEL

    out = args.out or (os.path.join(HERE, "..", "build", "bench-quick") if q else os.path.join(HERE, "results"))
    info = machine_info("cpu")
    print(", ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    peers, skipped = {}, []
    # SIGTERM (a timeout, a CI runner) unwinds like Ctrl-C, so that a server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or SHIPPED_MODEL
        description = args.model or "the shipped model"
        if args.gpt2_small:
            from bench_quantized_peers import hf_folder
            from bench_serving import gpt2_small_hf

            model_dir, _ = hf_folder(gpt2_small_hf(), tmp)  # with a tokenizer, which the GGUF converter reads
            description = "GPT-2-small shape, random weights"
        server_args = ["--model", model_dir, "--dtype", args.dtype]
        for flag in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory"):
            if getattr(args, flag) is not None:
                server_args += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        server = start_server(server_args, os.path.join(tmp, "server.log"))
        try:
            import httpx

            (served,) = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
            context, vocab = served["max_model_len"], _vocab_size(model_dir)
            print(f"server at {server.url}: {served['id']}, context {context}", flush=True)
            rows = sweep(server.url, served["id"], context, vocab, rates, args)
            kv = gauges(server.url)
        finally:
            server.stop()
        if args.llama_cpp_src:
            peer = _llama_server_sweep(args, model_dir, tmp, context, vocab, rates, skipped)
            if peer is not None:
                peers["llama.cpp llama-server (f32)"] = peer
    config = {"model": description, "dtype": args.dtype, "server_args": " ".join(server_args[4:]),
              "context": context, "min_len": args.min_len, "max_len": args.max_len, "rates": rates,
              "duration_s": args.duration, "min_requests": args.min_requests, "max_requests": args.max_requests,
              "seed": args.seed, "slo_ttft_s": args.slo_ttft, "quick": q}
    data = {"title": "Serving under load: Poisson arrivals against `python -m fusedformer serve`", "suite": SUITE,
            "machine": info, "config": config, "results": rows, "held_rate": held_rate(rows), "kv": kv}
    if peers or skipped:
        data.update(peers=peers, skipped=skipped)
    table = render(data)
    print("\n" + table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(f"# {data['title']}\n\n" + ", ".join(f"{k}: {v}" for k, v in info.items()) + "\n\n" + table)
    print(f"wrote {os.path.normpath(out)}/{stem}.json and .md")
    failed = [r for r in rows + [r for p in peers.values() for r in p["results"]] if r.get("failed")]
    if failed:
        print(f"{len(failed)} rate(s) failed validation and were not reported")
        return 1
    return 0


def _llama_server_sweep(args, model_dir, tmp, context, vocab, rates, skipped):
    """The sweep against llama-server on ``model_dir``'s weights in an f32 GGUF: {"server_args",
    "results", "held_rate"}, or None with the reason in ``skipped``."""
    from bench_quantized_peers import llama_cpp_f32_gguf

    binary, error = llama_server_binary(args.llama_cpp_src, os.path.join(HERE, "..", "build", "llama-server"))
    if binary is None:
        skipped.append(f"llama.cpp llama-server: the CMake build failed ({error})")
        print("note: " + skipped[-1], flush=True)
        return None
    gguf = os.path.join(tmp, "gpt2-small-f32.gguf")
    error = llama_cpp_f32_gguf(args.llama_cpp_src, model_dir, gguf)
    if error is not None:
        skipped.append(f"llama.cpp llama-server: convert_hf_to_gguf.py failed ({error})")
        print("note: " + skipped[-1], flush=True)
        return None
    server, options = start_llama_server(binary, gguf, args.llama_slots, context, os.path.join(tmp, "llama.log"))
    try:
        print(f"llama-server at {server.url}: {options}", flush=True)
        rows = sweep(server.url, "gpt2-small", context, vocab, rates, args)
    finally:
        server.stop()
    return {"server_args": options, "results": rows, "held_rate": held_rate(rows)}


if __name__ == "__main__":
    sys.exit(main())

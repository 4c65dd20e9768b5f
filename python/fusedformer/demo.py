"""The demo: (1) a pre-norm Transformer encoder block built from the fused ops, forward and backward,
against the same block in plain PyTorch (same weights): max error and speedup; (2) text streamed from
the model shipped in the package; (3) its decode tokens/s against the same model in plain PyTorch;
(4) the serving engine (``LLM.generate``: continuous batching over a paged KV cache) answering a batch
of concurrent requests, its output tokens/s beside ``fusedformer.generate`` in static batches of 8."""

import math
import statistics
import time

import torch
import torch.nn.functional as F

from . import ops


class _Weights:
    def __init__(self, d, h, ff, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)

        def p(*shape, std=None):
            std = std if std is not None else 1.0 / math.sqrt(shape[-1])
            return (torch.randn(*shape, generator=g) * std).to(dtype).requires_grad_()

        self.h = h
        self.ln1_w, self.ln1_b = p(d, std=0.1), p(d, std=0.1)
        self.ln2_w, self.ln2_b = p(d, std=0.1), p(d, std=0.1)
        with torch.no_grad():
            self.ln1_w += 1
            self.ln2_w += 1
        self.w_qkv, self.b_qkv = p(3 * d, d), p(3 * d, std=0.02)
        self.w_o, self.b_o = p(d, d), p(d, std=0.02)
        self.w_1, self.b_1 = p(ff, d), p(ff, std=0.02)
        self.w_2, self.b_2 = p(d, ff), p(d, std=0.02)
        self.w_cls = p(16, d)

    def params(self):
        return [v for k, v in vars(self).items() if isinstance(v, torch.Tensor)]


def _block(x, w, fused):
    """x (B, L, D) -> class probabilities (B, L, 16): LN, attention, residual + LN, MLP, head."""
    B, L, D = x.shape
    H = w.h
    a = ops.layer_norm(x, D, w.ln1_w, w.ln1_b) if fused else F.layer_norm(x, (D,), w.ln1_w, w.ln1_b)
    q, k, v = F.linear(a, w.w_qkv, w.b_qkv).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
    att = ops.attention(q, k, v) if fused else F.scaled_dot_product_attention(q, k, v)
    att = F.linear(att.transpose(1, 2).reshape(B, L, D), w.w_o, w.b_o)
    if fused:
        m, h = ops.layer_norm(att, D, w.ln2_w, w.ln2_b, residual=x)
    else:
        h = att + x
        m = F.layer_norm(h, (D,), w.ln2_w, w.ln2_b)
    h = h + F.linear(F.gelu(F.linear(m, w.w_1, w.b_1)), w.w_2, w.b_2)
    logits = F.linear(h, w.w_cls)
    return ops.softmax(logits, -1) if fused else torch.softmax(logits, -1)


def run(batch=8, seq=512, d_model=768, heads=12, reps=5, dtype=torch.float32, out=print, generation=True,
        prompt="import os\n\n\ndef ", new_tokens=100, seed=0, timed_tokens=64, requests=32, max_request_len=96):
    res = run_block(batch, seq, d_model, heads, reps, dtype, out)
    if generation:
        res.update(run_generation(prompt, new_tokens, seed, reps, out, timed_tokens))
        res.update(run_serving(requests, max_request_len, out))
    return res


def run_serving(requests=32, max_len=96, out=print):
    """``requests`` requests with prompt and output lengths drawn from [8, max_len], answered by the
    serving engine all at once and by ``fusedformer.generate`` in static batches of 8 (greedy, the
    same tokens checked on the first few)."""
    from .serving import LLM
    from .serving.throughput import compare, random_workload

    llm = LLM(max_num_seqs=requests)
    c = llm.engine.model.config
    reqs = random_workload(requests, 8, max_len, c.n_positions, c.vocab_size)
    r = compare(llm, reqs, batch=8, validate=4)
    out(f"serving {requests} requests at once (prompts and outputs of 8-{max_len} tokens, greedy): "
        f"LLM.generate {r['llm_generate_tok_s']:.1f} output tokens/s, fusedformer.generate in static batches "
        f"of 8 {r['static_batch8_tok_s']:.1f} tokens/s: {r['ratio']:.2f}x (same tokens on the first 4: True)")
    return {"serving_tok_s": r["llm_generate_tok_s"], "static_tok_s": r["static_batch8_tok_s"],
            "serving_ratio": r["ratio"]}


def run_generation(prompt, new_tokens, seed, reps, out=print, timed_tokens=64):
    """Stream a sampled continuation of ``prompt`` from the shipped model, then time greedy decoding
    with the fused ops and with plain PyTorch (the same model and weights, ``set_fused(False)``)."""
    import copy

    from . import generate
    from .models import set_fused
    from .textgen import load_model, stream_text

    model, tok = load_model()
    c = model.config
    out(f"\nthe shipped model ({c.n_layer} layers, d_model {c.d_model}, vocab {c.vocab_size}, context "
        f"{c.n_positions}), sampled with temperature 0.8, top-p 0.95, seed {seed}:")
    out("-" * 72)
    pieces = [prompt]
    out(prompt, end="", flush=True)
    stats = stream_text(model, tok, prompt, max_new_tokens=new_tokens, seed=seed, temperature=0.8, top_p=0.95,
                        do_sample=True, write=lambda s: (pieces.append(s), out(s, end="", flush=True)))
    out("\n" + "-" * 72)
    out(f"  {stats['tokens']} tokens streamed at {stats['tokens_per_s']:.1f} tokens/s")
    ids = torch.tensor([tok.encode(prompt).ids])
    plain = set_fused(copy.deepcopy(model), False)
    n = min(timed_tokens, c.n_positions - ids.shape[1])

    def decode(m):
        t0 = time.perf_counter()
        y = generate(m, ids, max_new_tokens=n, eos_token_id=[])
        return time.perf_counter() - t0, y

    times = {"fused": [], "plain": []}
    outputs = {}
    for _ in range(max(3, reps)):
        for name, m in (("fused", model), ("plain", plain)):
            t, outputs[name] = decode(m)
            times[name].append(t)
    same = torch.equal(outputs["fused"], outputs["plain"])
    tf, tp = statistics.median(times["fused"]), statistics.median(times["plain"])
    out(f"greedy decode, batch 1, {n} new tokens: fusedformer {n / tf:.1f} tokens/s, plain PyTorch {n / tp:.1f} "
        f"tokens/s: {tp / tf:.2f}x (same tokens: {same})")
    return {"gen_tokens_per_s": n / tf, "plain_tokens_per_s": n / tp, "same_tokens": same}


def run_block(batch=8, seq=512, d_model=768, heads=12, reps=5, dtype=torch.float32, out=print):
    torch.manual_seed(0)
    w = _Weights(d_model, heads, 4 * d_model, dtype)
    x = torch.randn(batch, seq, d_model, dtype=dtype).requires_grad_()
    g = torch.randn(batch, seq, 16, dtype=dtype)
    params = [x] + w.params()

    def step(fused):
        y = _block(x, w, fused)
        grads = torch.autograd.grad(y, params, g)
        return y, grads

    out(f"encoder block, batch {batch} x {seq} x {d_model}, {heads} heads, {str(dtype).split('.')[-1]}, "
        f"{torch.get_num_threads()} threads: forward + backward")
    y_f, g_f = step(True)
    y_t, g_t = step(False)
    err_y = (y_f - y_t).abs().max().item()
    err_g = max((a - b).abs().max().item() / max(1e-12, b.abs().max().item()) for a, b in zip(g_f, g_t))
    out(f"  max |output difference| {err_y:.2e}; max gradient difference (relative to its max) {err_g:.2e}")
    times = {True: [], False: []}
    for _ in range(reps):
        for fused in (True, False):
            t0 = time.perf_counter()
            step(fused)
            times[fused].append(time.perf_counter() - t0)
    tf, tt = statistics.median(times[True]), statistics.median(times[False])
    out(f"  fusedformer {tf * 1e3:.1f} ms, plain PyTorch {tt * 1e3:.1f} ms (medians of {reps}): "
        f"{tt / tf:.2f}x")
    return {"err_out": err_y, "err_grad": err_g, "fused_ms": tf * 1e3, "torch_ms": tt * 1e3}

"""The LLM engine against fusedformer.generate: greedy output token for token whatever the mix of prompt
lengths, the step's token budget (chunked prefill), a pool small enough to preempt, forked samples
and prefix-cache hits; every block back in the pool once every request has ended."""

import pytest
import torch

import fusedformer
from fusedformer.models import GPT, GPTConfig
from fusedformer.serving import LLM, SamplingParams
from fusedformer.serving.block_pool import kv_block_bytes

SHAPES = {
    "gpt2": dict(),
    "llama": dict(n_kv_head=2, norm="rmsnorm", activation="swiglu", positions="rotary", attn_bias=False,
                  out_bias=False, mlp_bias=False, tie_embeddings=False),
}


def tiny(kind="gpt2"):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=101, n_positions=96, d_model=32, n_layer=2, n_head=4, **SHAPES[kind])
    model = GPT(cfg).double().eval()
    with torch.no_grad():  # logits far enough apart that greedy choices are not near-ties
        model.embed.weight.mul_(20)
    return model


def engine(model, num_blocks=None, **options):
    if num_blocks is not None:
        c = model.config
        bs = options.get("block_size", 16)
        options["kv_cache_memory"] = num_blocks * kv_block_bytes(c.n_layer, c.n_kv_head, c.head_dim, bs, 8)
    return LLM(model, **options)


def reference(model, prompt, n):
    out = fusedformer.generate(model, torch.tensor([prompt]), max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (n,), generator=g).tolist() for n in lengths]


def check_greedy(llm, model, prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.prompt_token_ids == p and o.finished
        assert o.outputs[0].token_ids == reference(model, p, m), f"prompt of {len(p)} tokens"
        assert o.outputs[0].finish_reason == "length"
    pool = llm.engine.pool
    assert pool.num_held == 0 and pool.num_free == pool.num_blocks
    return outs


LENGTHS = [1, 5, 16, 17, 33, 40, 3]
MAX_TOKENS = [9, 20, 4, 12, 16, 7, 25]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_generate_for_a_mix_of_prompt_lengths(kind):
    model = tiny(kind)
    check_greedy(engine(model), model, prompts_of(LENGTHS), MAX_TOKENS)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_generate_with_chunked_prefill(kind):
    model = tiny(kind)
    llm = engine(model, block_size=4, max_num_batched_tokens=7, max_num_seqs=3)
    check_greedy(llm, model, prompts_of(LENGTHS, seed=1), MAX_TOKENS)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_generate_when_the_pool_is_small_enough_to_preempt(kind):
    model = tiny(kind)
    llm = engine(model, num_blocks=14, block_size=4)
    # all four fit at first (3 blocks each), then their decodes outgrow the pool
    check_greedy(llm, model, prompts_of([9, 10, 11, 12], seed=2), [30, 28, 26, 30])
    assert llm.engine.scheduler.num_preemptions > 0


def test_n_samples_share_the_prompt_blocks_and_each_decodes_like_generate():
    model = tiny("llama")
    llm = engine(model, block_size=4)
    prompts = prompts_of([6, 11])
    outs = llm.generate(prompts, SamplingParams(n=3, temperature=0.0, max_tokens=10), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert [c.index for c in o.outputs] == [0, 1, 2]
        for c in o.outputs:
            assert c.token_ids == reference(model, p, 10)
    assert llm.engine.pool.num_held == 0


def test_n_samples_under_preemption():
    model = tiny("gpt2")
    llm = engine(model, num_blocks=9, block_size=4)
    prompts = prompts_of([7, 13])
    outs = llm.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=18), use_tqdm=False)
    for p, o in zip(prompts, outs):
        for c in o.outputs:
            assert c.token_ids == reference(model, p, 18)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.pool.num_held == 0


def test_prefix_cache_hits_are_reported_and_give_the_same_output():
    model = tiny("llama")
    system = prompts_of([37], seed=5)[0]
    first, second, third = (system + tail for tail in prompts_of([3, 5, 9], seed=6))
    llm = engine(model, block_size=8)
    (a,) = llm.generate([first], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert a.num_cached_tokens == 0
    outs = llm.generate([second, third], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    for p, o in zip((second, third), outs):
        assert o.num_cached_tokens == 32  # the four full blocks of the shared 37 tokens
        assert o.outputs[0].token_ids == reference(model, p, 6)
    assert llm.engine.pool.num_held == 0
    off = engine(model, block_size=8, enable_prefix_caching=False)
    off.generate([first], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    (o,) = off.generate([second], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert o.num_cached_tokens == 0 and o.outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_logprobs_are_the_log_softmax_of_the_models_logits():
    model = tiny("gpt2")
    llm = engine(model)
    prompt = prompts_of([9])[0]
    (o,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3), use_tqdm=False)
    c = o.outputs[0]
    full = torch.tensor([prompt + c.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(model(full)[0].float(), -1)[len(prompt) - 1:-1]  # (5, V)
    assert len(c.logprobs) == 5
    total = 0.0
    for t, (tok, lps) in enumerate(zip(c.token_ids, c.logprobs)):
        top = torch.topk(ref[t], 3)
        assert list(lps)[:3] == top.indices.tolist()
        for r, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            assert lps[i].rank == r + 1 and lps[i].logprob == pytest.approx(v, abs=1e-5)
        assert lps[tok].logprob == pytest.approx(float(ref[t, tok]), abs=1e-5)
        total += float(ref[t, tok])
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_a_sampled_token_outside_the_top_k_is_listed_with_its_rank():
    model = tiny("gpt2")
    llm = engine(model)
    (o,) = llm.generate([[1, 2, 3]], SamplingParams(temperature=5.0, max_tokens=12, logprobs=0, seed=3),
                        use_tqdm=False)
    for tok, lps in zip(o.outputs[0].token_ids, o.outputs[0].logprobs):
        assert list(lps) == [tok] and lps[tok].rank >= 1
    assert any(lps[t].rank > 1 for t, lps in zip(o.outputs[0].token_ids, o.outputs[0].logprobs))


def test_a_seed_gives_the_same_samples_whatever_else_is_in_the_batch():
    model = tiny("llama")
    prompt = prompts_of([8])[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=15, seed=42)
    (alone,) = engine(model).generate([prompt], seeded, use_tqdm=False)
    others = prompts_of([3, 20, 11], seed=9)
    batch = [others[0], prompt, others[1], others[2]]
    params = [SamplingParams(temperature=0.8, max_tokens=15, seed=1), seeded, SamplingParams(temperature=1.0, max_tokens=15),
              SamplingParams(temperature=0.0, max_tokens=5)]
    outs = engine(model, block_size=4, max_num_batched_tokens=9).generate(batch, params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids
    (other_seed,) = engine(model).generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=15, seed=43),
                                           use_tqdm=False)
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids


def test_stop_token_ids_and_min_tokens():
    model = tiny("gpt2")
    llm = engine(model)
    prompt = prompts_of([6])[0]
    greedy = reference(model, prompt, 10)
    (o,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[99, greedy[0]]),
                        use_tqdm=False)
    c = o.outputs[0]
    assert c.token_ids == greedy[:1] and c.finish_reason == "stop" and c.stop_reason == greedy[0]
    # before min_tokens the stop token may not be chosen at all
    (o,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4,
                                                 stop_token_ids=[greedy[0]]), use_tqdm=False)
    c = o.outputs[0]
    assert c.token_ids[0] != greedy[0] and greedy[0] not in c.token_ids[:4]
    assert len(c.token_ids) >= 4


def test_eos_ends_a_sequence_unless_ignored():
    model = tiny("gpt2")
    prompt = prompts_of([5])[0]
    greedy = reference(model, prompt, 8)
    model.config.eos_token_id = greedy[0]
    llm = engine(model)
    (o,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert o.outputs[0].token_ids == greedy[:1] and o.outputs[0].finish_reason == "stop"
    assert o.outputs[0].stop_reason is None
    (o,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert o.outputs[0].token_ids == greedy and o.outputs[0].finish_reason == "length"


def test_generation_ends_at_the_models_context():
    model = tiny("gpt2")
    llm = engine(model)
    prompt = prompts_of([90])[0]
    (o,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=None), use_tqdm=False)
    assert len(o.outputs[0].token_ids) == 6 and o.outputs[0].finish_reason == "length"
    assert o.outputs[0].token_ids == reference(model, prompt, 6)


def test_bad_prompts_raise_and_leave_nothing_behind():
    model = tiny("gpt2")
    llm = engine(model, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="exceed the model's context"):
        llm.generate([list(range(97))], use_tqdm=False)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[1, 2], list(range(10))], SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        llm.generate("hello", use_tqdm=False)
    with pytest.raises(ValueError, match="non-empty list"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 101\)"):
        llm.generate([[5, 101]], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([[1]], sampling_params={"temperature": 0}, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.pool.num_held == 0
    (o,) = llm.generate([[1, 2]], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert o.outputs[0].token_ids == reference(model, [1, 2], 3)


def test_engine_option_errors():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model, max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(model, kv_cache_memory=-1)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model, dtype="int8")


def test_random_workload_lengths_and_errors():
    from fusedformer.serving.throughput import random_workload

    reqs = random_workload(20, 8, 64, context=100, vocab=50, seed=3)
    assert reqs == random_workload(20, 8, 64, context=100, vocab=50, seed=3)  # the seed fixes it
    for prompt, n_out in reqs:
        assert 8 <= len(prompt) <= 50 and 1 <= n_out and len(prompt) + n_out <= 100
        assert all(1 <= t < 50 for t in prompt)
    for bad in ({"n": 0, "lo": 1, "hi": 2}, {"n": 2, "lo": 0, "hi": 2}, {"n": 2, "lo": 5, "hi": 4}):
        with pytest.raises(ValueError, match="random_workload"):
            random_workload(context=100, vocab=50, **bad)


def kv_steps(llm, prompts, params):
    """(blocks in use, tokens held) after every step of one generate call, and the engine's stats after it."""
    seen = []
    record = llm.engine.kv_usage.record

    def spy(blocks, tokens):
        seen.append((blocks, tokens))
        record(blocks, tokens)

    llm.engine.kv_usage.record = spy
    llm.generate(prompts, params, use_tqdm=False)
    return seen, llm.engine.stats()


def test_kv_utilization_of_known_lengths():
    # blocks of 4; prompts of 4 and 3 tokens with 6 and 2 output tokens, prefilled together. Tokens held
    # after each step (the last sampled token is not yet in the cache):
    #   step 1: 4 + 3 = 7 in 1 + 1 blocks; step 2: 5 + 4 = 9 in 2 + 1 (the second request ends);
    #   steps 3-6: 6, 7, 8, 9 in 2, 2, 2, 3 blocks
    llm = engine(tiny("gpt2"), block_size=4)
    params = [SamplingParams(temperature=0.0, max_tokens=6), SamplingParams(temperature=0.0, max_tokens=2)]
    seen, s = kv_steps(llm, prompts_of([4, 3]), params)
    assert seen == [(2, 7), (3, 9), (2, 6), (2, 7), (2, 8), (3, 9)]
    assert (s["kv_steps"], s["kv_peak_blocks_in_use"], s["kv_tokens_at_peak"]) == (6, 3, 9)
    assert s["kv_utilization_at_peak"] == pytest.approx(9 / 12)  # the first step at the peak
    assert s["kv_mean_utilization"] == pytest.approx((7 / 8 + 9 / 12 + 6 / 8 + 7 / 8 + 8 / 8 + 9 / 12) / 6)
    assert s["kv_utilization"] == pytest.approx(9 / 12) and s["kv_block_size"] == 4
    llm.engine.kv_usage.reset()
    assert llm.engine.stats()["kv_steps"] == 0 and llm.engine.stats()["kv_utilization_at_peak"] == 0.0


def test_kv_utilization_counts_shared_blocks_once():
    # two samples of a 6-token prompt, blocks of 4: the prompt's two blocks are shared after the prefill;
    # the first decode copies the half-full second block for one sample (copy-on-write), so the first
    # block alone stays shared: 4 + 3 + 3 tokens in 3 blocks, then 4 + 4 + 4
    llm = engine(tiny("llama"), block_size=4)
    seen, s = kv_steps(llm, prompts_of([6]), SamplingParams(n=2, temperature=0.0, max_tokens=3))
    assert seen == [(2, 6), (3, 10), (3, 12)]
    assert s["kv_utilization_at_peak"] == pytest.approx(10 / 12)
    assert s["kv_mean_utilization"] == pytest.approx((6 / 8 + 10 / 12 + 12 / 12) / 3)
    # prefix-cache hits share full blocks too: two requests whose 9 tokens start with the 8 of a finished
    # request take its two blocks back and each compute their last token into a block of their own
    prompt = prompts_of([9], seed=4)[0]
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    seen, _ = kv_steps(llm, [prompt, prompt[:8] + [7]], SamplingParams(temperature=0.0, max_tokens=2))
    assert seen == [(4, 8 + 1 + 1), (4, 8 + 2 + 2)]

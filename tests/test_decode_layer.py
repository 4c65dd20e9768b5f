"""fusedformer.ops.decode_layer: a GPT block for one new token per sequence in one op. The decode
steps of GPT (dense KV cache, CPU, no autograd) run through it; its logits equal the module path's
to the bit, for every block shape, projection scheme and dtype, and the model falls back to the
modules wherever the op would not compute what they do."""

import pytest
import torch

import fusedformer
from fusedformer import models, ops
from fusedformer.models import GPT, GPTConfig
from fusedformer.models import gpt as gpt_module
from fusedformer.models.blocks import Block
from fusedformer.ops.linear import uses_kernel
from fusedformer.ops.quantized_linear import GROUPED_SCHEMES

_ops = torch.ops.fusedformer

SHAPES = {
    "gpt2": dict(),
    "llama": dict(n_kv_head=2, positions="rotary", norm="rmsnorm", activation="swiglu", attn_bias=False,
                  mlp_bias=False, out_bias=False),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "relu": dict(activation="relu", n_head=2),
}


def _model(shape, scheme=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = dict(vocab_size=97, n_positions=64, d_model=64, n_layer=3, n_head=4)
    m = GPT(GPTConfig(**{**config, **SHAPES[shape]})).eval()
    m = m.to(dtype)
    if scheme is not None:
        fusedformer.quantize(m, scheme, group_size=32 if scheme in GROUPED_SCHEMES else None)
    return m


class _Spy:
    """Counts the model's calls of ops.decode_layer."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ops.decode_layer

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(gpt_module.ops, "decode_layer", spy)


def _greedy_logits(m, ids, mask=None, steps=6):
    """The logits of the prompt's last position and of each greedy step after it, decoded with a
    cache, positions counted over the unpadded tokens as generation does."""
    B, L = ids.shape
    mask = torch.ones_like(ids) if mask is None else mask
    cache = m.new_cache(B, L + steps)
    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = [m(ids, attention_mask=mask, position_ids=pos, cache=cache, last_only=True)]
        for _ in range(steps):
            tok = out[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], -1)
            pos = pos[:, -1:] + 1
            out.append(m(tok, attention_mask=mask, position_ids=pos, cache=cache, last_only=True))
    return torch.stack(out)


def _both_paths(m, ids, mask=None, steps=6):
    try:
        Block.fused_decode = False
        want = _greedy_logits(m, ids, mask, steps)
    finally:
        Block.fused_decode = True
    return _greedy_logits(m, ids, mask, steps), want


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("scheme", [None, "int8", "int4", "nf4", "int8_dynamic", "int4_dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_module_path(shape, scheme, dtype, monkeypatch):
    m = _model(shape, scheme, dtype)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    spy = _Spy(monkeypatch)
    got, want = _both_paths(m, ids, steps=6)
    assert spy.calls == 6 * 3  # every decode step, every block
    assert torch.equal(got, want)


def test_left_padded_batch_and_beams(monkeypatch):
    """Padding masks the keys (key_mask), and beam search reorders the cache between steps."""
    m = _model("llama", "int8")
    ids = torch.randint(1, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    spy = _Spy(monkeypatch)
    got, want = _both_paths(m, ids, mask)
    assert spy.calls > 0 and torch.equal(got, want)
    gen = dict(max_new_tokens=5, num_beams=3, eos_token_id=[])
    with torch.inference_mode():
        beams = fusedformer.generate(m, ids[:1], **gen)
        Block.fused_decode = False
        try:
            beams_modules = fusedformer.generate(m, ids[:1], **gen)
        finally:
            Block.fused_decode = True
    assert torch.equal(beams, beams_modules)


@pytest.mark.parametrize("dtype, batch", [(torch.float32, 17), (torch.bfloat16, 3)])
def test_rows_on_torch_linear(dtype, batch, monkeypatch):
    """Rows that fusedformer.linear gives to torch's product (float32 above SMALL_ROWS; bfloat16 above
    HALF_ROWS where the CPU has bfloat16 products) take it inside the op too (scheme "torch")."""
    m = _model("gpt2", dtype=dtype)
    ids = torch.randint(0, 97, (batch, 4), generator=torch.Generator().manual_seed(4))
    spy = _Spy(monkeypatch)
    got, want = _both_paths(m, ids, steps=3)
    assert spy.calls == 3 * 3 and torch.equal(got, want)
    h = torch.zeros(batch, 1, 64, dtype=dtype)
    with torch.inference_mode():
        schemes = m._decode_plans(h, m.new_cache(batch, 8))[0][1]
    assert schemes == ([""] * 4 if uses_kernel(h) else ["torch"] * 4)
    if dtype == torch.float32:
        assert schemes == ["torch"] * 4


def test_float64_and_head_dim_not_power_of_two(monkeypatch):
    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=50, n_positions=32, d_model=120, n_layer=2, n_head=3)).eval().double()
    ids = torch.randint(0, 50, (1, 4))
    spy = _Spy(monkeypatch)
    got, want = _both_paths(m, ids)
    assert spy.calls > 0 and torch.equal(got, want)


def _modules_only(m, monkeypatch, **kw):
    """Runs a decode and returns how many times the op ran."""
    spy = _Spy(monkeypatch)
    _greedy_logits(m, torch.randint(0, 97, (1, 4)), steps=3, **kw)
    return spy.calls


def test_falls_back_to_modules(monkeypatch):
    m = _model("gpt2", "int8")
    assert _modules_only(m, monkeypatch) == 9
    # a forward hook must fire on every step: the model runs its modules
    seen = []
    handle = m.blocks[1].mlp.down.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    assert _modules_only(m, monkeypatch) == 0 and len(seen) == 4
    handle.remove()
    # plain PyTorch functions (set_fused) and a replaced projection
    models.set_fused(m, False)
    assert _modules_only(m, monkeypatch) == 0
    models.set_fused(m, True)
    m.blocks[0].attn.out = torch.nn.Linear(64, 64)
    assert _modules_only(m, monkeypatch) == 0
    # autograd: a decode step with gradients recorded runs the modules
    m2 = _model("gpt2")
    spy = _Spy(monkeypatch)
    cache = m2.new_cache(1, 8)
    m2(torch.randint(0, 97, (1, 3)), cache=cache)
    assert m2(torch.randint(0, 97, (1, 1)), cache=cache).requires_grad
    assert spy.calls == 0


def test_full_cache_error():
    m = _model("gpt2")
    cache = m.new_cache(1, 4)
    with torch.inference_mode():
        m(torch.randint(0, 97, (1, 4)), cache=cache)
        with pytest.raises(ValueError, match="exceed its max_len 4"):
            m(torch.randint(0, 97, (1, 1)), cache=cache)


def _op_args(m, B=2, position=5):
    plan = m.blocks[0].decode_plan(torch.float32)
    params, schemes, kw = plan
    cache = m.new_cache(B, 8)
    cache.k.normal_()
    cache.v.normal_()
    h, delta = torch.randn(B, 1, 64), torch.randn(B, 1, 64)
    mask = torch.ones(B, 1, 1, position + 1, dtype=torch.bool)
    mask[0, ..., 0] = False
    return [h, delta, params, schemes, cache.k[0], cache.v[0], position, mask, None, None, kw["n_head"], kw["rms"],
            kw["eps"], kw["activation"]]


@pytest.mark.parametrize("scheme", [None, "int4"])
def test_opcheck(scheme):
    args = _op_args(_model("gpt2", scheme))
    args[4], args[5] = args[4].clone(), args[5].clone()
    torch.library.opcheck(_ops.decode_layer.default, tuple(args))


@pytest.mark.parametrize("index, value, match", [
    (2, [], "params must hold 16 entries"),
    (3, ["", ""], "schemes must hold 4 entries"),
    (6, 8, r"position must be in \[0, 8\)"),
    (6, -1, r"position must be in \[0, 8\)"),
    (10, 3, "n_head must be a positive multiple"),
    (10, 8, "the qkv projection gives 192 features"),
    (13, "silu", "activation must be gelu, gelu_tanh, relu or swiglu"),
    (0, torch.randn(2, 2, 64), r"h must be \(batch, 1, d_model\)"),
    (1, torch.randn(2, 1, 32), "delta must have h's shape"),
    (4, torch.randn(3, 4, 8, 16), "k_cache must be"),
    (4, torch.randn(2, 4, 8, 16, dtype=torch.float64), "k_cache"),
    (5, torch.randn(2, 4, 7, 16), "v_cache must have k_cache's shape"),
    (8, torch.ones(2, 1, 1, 16), "rope_cos and rope_sin must be given together"),
])
def test_bad_arguments(index, value, match):
    args = _op_args(_model("gpt2"))
    args[index] = value
    with pytest.raises((ValueError, TypeError), match=match):
        _ops.decode_layer(*args)


def test_bad_projection_arguments():
    args = _op_args(_model("gpt2", "int8"))
    args[2] = list(args[2])
    args[2][3] = None  # the qkv projection's scale
    with pytest.raises(ValueError, match=r"params\[3\] \(the scale of a int8 projection\)"):
        _ops.decode_layer(*args)
    args = _op_args(_model("gpt2", "int8"))
    args[3] = ["int9", "int8", "int8", "int8"]
    with pytest.raises(ValueError, match="scheme must be"):
        _ops.decode_layer(*args)

"""fusedformer.nn Transformer layers and stacks against torch.nn: outputs and gradients for
batch_first / norm_first both ways, activations, masks and causal masking, train (dropout 0) and
eval modes; strict state_dict round trips; dropout in training; torch.compile."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedformer.nn as fnn

D, H, FF, N, L, S = 32, 4, 48, 3, 7, 5


def _copy(ref_cls, ours_cls, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ref_cls(*args, **kw)
        ours = ours_cls(*args, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _x(batch_first, length, requires_grad=True):
    shape = (N, length, D) if batch_first else (length, N, D)
    return torch.randn(shape, requires_grad=requires_grad)


def _padding(length, dtype=torch.bool):
    pad = torch.zeros(N, length, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, -1] = True
    if dtype == torch.bool:
        return pad
    return torch.zeros(N, length).masked_fill(pad, float("-inf"))


def _check(ours, ref, args, kwargs, inputs, *, valid=None):
    """Outputs (at the ``valid`` positions) and gradients of inputs and parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ours(*args, **kwargs)
        out_ref = ref(*args, **kwargs)
    if valid is not None:
        out, out_ref = out[valid], out_ref[valid]
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=2e-5)
    if not torch.is_grad_enabled():
        return
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs + list(ours.parameters()), g)
    want = torch.autograd.grad(out_ref, inputs + list(ref.parameters()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _check_eval(ours, ref, args, kwargs, inputs):
    """Eval mode: with autograd (torch.nn's regular path; ours composes unfused residual steps),
    then ours without autograd (the inference path, fused residual steps) against the same numbers.
    torch.nn's own no-grad fast path is compared in test_encoder_stack (it returns NaN for a float
    src_mask, so it is not the reference here)."""
    ours.eval()
    ref.eval()
    _check(ours, ref, args, kwargs, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref(*args, **kwargs)
        with torch.no_grad():
            got = ours(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "F.gelu": F.gelu, "callable": lambda t: torch.tanh(t) * 2}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_encoder_layer(batch_first, norm_first, activation):
    ours, ref = _copy(torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, D, H, FF, dropout=0.0,
                      activation=ACTIVATIONS[activation], batch_first=batch_first, norm_first=norm_first)
    x = _x(batch_first, L)
    _check(ours, ref, (x,), dict(src_key_padding_mask=_padding(L)), [x])


MASKS = ["none", "bool", "float", "causal", "causal_pad", "bool_pad", "float_padfloat"]


def _masks(kind, length):
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length)
    m = {"none": (None, None, False), "bool": (torch.rand(length, length) < 0.3, None, False)}
    if kind in m:
        mask, pad, is_causal = m[kind]
        if mask is not None:
            mask[:, 0] = False
        return mask, pad, is_causal
    if kind == "float":
        return torch.randn(length, length), None, False
    if kind == "causal":
        return causal, None, True
    if kind == "causal_pad":
        return causal, _padding(length), True
    if kind == "bool_pad":
        mask = torch.rand(length, length) < 0.3
        mask[:, 0] = False
        return mask, _padding(length), False
    return torch.randn(length, length), _padding(length, torch.float32), False


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_masks(kind, norm_first, batch_first):
    ours, ref = _copy(torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, D, H, FF, dropout=0.0,
                      batch_first=batch_first, norm_first=norm_first)
    mask, pad, is_causal = _masks(kind, L)
    x = _x(batch_first, L)
    kwargs = dict(src_mask=mask, src_key_padding_mask=pad, is_causal=is_causal)
    _check(ours, ref, (x,), kwargs, [x])
    _check_eval(ours, ref, (x,), kwargs, [x])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kind", ["none", "causal_pad", "bool_pad", "float_padfloat"])
def test_decoder_layer(batch_first, norm_first, kind):
    ours, ref = _copy(torch.nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer, D, H, FF, dropout=0.0,
                      activation="gelu", batch_first=batch_first, norm_first=norm_first)
    tgt, memory = _x(batch_first, L), _x(batch_first, S)
    mask, pad, is_causal = _masks(kind, L)
    mem_mask = torch.rand(L, S) < 0.3
    mem_mask[:, 0] = False
    kwargs = dict(tgt_mask=mask, tgt_key_padding_mask=pad, tgt_is_causal=is_causal, memory_mask=mem_mask,
                  memory_key_padding_mask=_padding(S))
    _check(ours, ref, (tgt, memory), kwargs, [tgt, memory])
    _check_eval(ours, ref, (tgt, memory), kwargs, [tgt, memory])


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kind", ["none", "causal", "causal_pad", "bool_pad"])
def test_encoder_stack(norm_first, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    ref = torch.nn.TransformerEncoder(layer, 3, norm=torch.nn.LayerNorm(D))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = fnn.TransformerEncoder(fnn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                                              norm_first=norm_first), 3, norm=fnn.LayerNorm(D))
    ours.load_state_dict(ref.state_dict(), strict=True)
    mask, pad, is_causal = _masks(kind, L)
    x = _x(True, L)
    # is_causal=None: the stack detects the causal mask itself, as torch.nn does
    _check(ours, ref, (x,), dict(mask=mask, src_key_padding_mask=pad), [x])
    # eval without grad: torch.nn's nested-tensor fast path zeroes padded positions, so compare the rest
    ours.eval()
    ref.eval()
    valid = ~pad if pad is not None else None
    with torch.no_grad():
        _check(ours, ref, (x,), dict(mask=mask, src_key_padding_mask=pad), [x], valid=valid)


def test_encoder_stack_converts_torch_layers():
    """fusedformer.nn.TransformerEncoder given a torch.nn layer runs fusedformer layers."""
    layer = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)
    enc = fnn.TransformerEncoder(layer, 2)
    assert all(type(m) is fnn.TransformerEncoderLayer for m in enc.layers)
    assert type(enc.layers[0].self_attn) is fnn.MultiheadAttention
    assert type(layer) is torch.nn.TransformerEncoderLayer  # the given layer itself is left alone


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer(batch_first, norm_first):
    ours, ref = _copy(torch.nn.Transformer, fnn.Transformer, D, H, 2, 2, FF, dropout=0.0, batch_first=batch_first,
                      norm_first=norm_first)
    src, tgt = _x(batch_first, S), _x(batch_first, L)
    tgt_mask = fnn.Transformer.generate_square_subsequent_mask(L)
    torch.testing.assert_close(tgt_mask, torch.nn.Transformer.generate_square_subsequent_mask(L))
    _check(ours, ref, (src, tgt), dict(tgt_mask=tgt_mask, src_key_padding_mask=_padding(S),
                                       memory_key_padding_mask=_padding(S), tgt_key_padding_mask=_padding(L)),
           [src, tgt])


def test_unbatched_layers():
    enc, enc_ref = _copy(torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, D, H, FF, dropout=0.0)
    dec, dec_ref = _copy(torch.nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer, D, H, FF, dropout=0.0)
    x = torch.randn(L, D, requires_grad=True)
    m = torch.randn(S, D, requires_grad=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    _check(enc, enc_ref, (x,), dict(src_mask=causal, is_causal=True), [x])
    _check(dec, dec_ref, (x, m), dict(tgt_mask=causal, tgt_is_causal=True), [x, m])


def test_state_dict_round_trip_strict():
    ref = torch.nn.Transformer(D, H, 2, 1, FF, batch_first=True)
    ours = fnn.Transformer(D, H, 2, 1, FF, batch_first=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = torch.nn.Transformer(D, H, 2, 1, FF, batch_first=True)
    back.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(back.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_constructor_defaults_match_torch():
    ours, ref = fnn.TransformerEncoderLayer(D, H), torch.nn.TransformerEncoderLayer(D, H)
    assert ours.linear1.out_features == ref.linear1.out_features == 2048
    assert ours.dropout.p == ref.dropout.p == 0.1
    assert ours.self_attn.batch_first is False and ours.norm_first is False
    assert ours.norm1.eps == ref.norm1.eps
    t = fnn.Transformer()
    assert t.d_model == 512 and t.nhead == 8 and len(t.encoder.layers) == 6 and len(t.decoder.layers) == 6
    assert isinstance(t, torch.nn.Transformer) and isinstance(t.encoder, torch.nn.TransformerEncoder)
    no_bias = fnn.TransformerEncoderLayer(D, H, bias=False)
    assert no_bias.linear1.bias is None and no_bias.norm1.bias is None and no_bias.self_attn.in_proj_bias is None


def test_dropout_in_training():
    """With dropout > 0 the layer trains: reproducible under a seed, different from eval, finite
    gradients; eval is deterministic."""
    layer = fnn.TransformerEncoderLayer(D, H, FF, dropout=0.3, batch_first=True)
    x = _x(True, L)
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    b = layer(x)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    layer.eval()
    with torch.no_grad():
        c, d = layer(x), layer(x)
    torch.testing.assert_close(c, d)
    assert not torch.allclose(a, c)


def test_custom_submodules_fall_back_to_torch():
    """A layer whose attention was replaced by a foreign module runs torch.nn's forward."""
    ours, ref = _copy(torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, D, H, FF, dropout=0.0,
                      batch_first=True)
    attn = torch.nn.MultiheadAttention(D, H, batch_first=True)
    attn.load_state_dict(ours.self_attn.state_dict())
    ours.self_attn = attn
    assert not ours.fusable()
    x = _x(True, L)
    _check(ours, ref, (x,), {}, [x])


def test_compile_patched_encoder():
    """torch.compile(fullgraph=True) of a patched torch.nn encoder gives the eager numbers."""
    import fusedformer

    layer = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True)
    enc = fusedformer.patch(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(N, L, D)
    pad = _padding(L)
    eager = enc(x, src_key_padding_mask=pad)
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, src_key_padding_mask=pad), eager, rtol=1e-5, atol=1e-5)


def test_feed_forward_row_blocks_in_training(monkeypatch):
    """A feed-forward split into row blocks (each under MAX_BLOCK_BYTES) runs the fused ReLU block
    on each: outputs and gradients of torch.nn's layer."""
    from fusedformer.ops import _blocks

    monkeypatch.setattr(_blocks, "MAX_BLOCK_BYTES", 5 * FF * 4)  # 5 rows a block: 21 rows in 5 blocks
    ours, ref = _copy(torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, D, H, FF, dropout=0.0,
                      batch_first=True)
    x = _x(True, L)
    _check(ours, ref, (x,), {}, [x])


def test_compile_training_gradients():
    """torch.compile(fullgraph=True) of a layer in training (the fused ReLU feed-forward's autograd
    function and the custom ops' backward traced) gives the eager output and gradients."""
    ours, _ = _copy(torch.nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, D, H, FF, dropout=0.0,
                    batch_first=True)
    x = _x(True, L)
    params = [x] + list(ours.parameters())
    eager = ours(x)
    want = torch.autograd.grad(eager.square().sum(), params)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    got = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

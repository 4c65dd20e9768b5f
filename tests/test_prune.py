"""fusedformer.prune: magnitude and N:M masks that keep their zeros through fine-tuning and
checkpoints; structured pruning whose shrunk model computes exactly what the model with the removed
heads and neurons zeroed computes; and the errors that leave the model unchanged."""

import copy

import pytest
import torch

import fusedformer
from fusedformer.models import GPT
from fusedformer.nn.masked import masked_layers
from fusedformer.pruning import structured
from fusedformer.train import train_step

LAYERS = {f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")}


def _gpt(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_positions=64, d_model=64, n_layer=2, n_head=4)
    cfg.update(kw)
    return GPT(**cfg).to(dtype).eval()


def _ids(b=2, t=11):
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(1))


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n in LAYERS}


def _unchanged(model, snap):
    state, config = snap
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[n], state[n]) for n in state) and \
        model.config.to_dict() == config


def _snapshot(model):
    return {n: t.clone() for n, t in model.state_dict().items()}, model.config.to_dict()


def _fine_tune(model, steps=3):
    """A few AdamW steps (weight decay on) through fusedformer's train step; the losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = _ids(4, 16)
    return [train_step(model, opt, ids[:, :-1], ids[:, 1:], grad_clip=1.0) for _ in range(steps)]


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
def test_magnitude_removes_exactly_the_smallest_weights(amount):
    model = _gpt()
    before = _weights(model)
    assert fusedformer.prune(model, "magnitude", amount=amount) is model
    assert set(masked_layers(model)) == LAYERS
    assert model.head.weight is model.embed.weight and not (model.embed.weight == 0).any()
    report = fusedformer.sparsity(model)
    for name, w in _weights(model).items():
        w0 = before[name]
        zero = w == 0
        assert int(zero.sum()) == round(amount * w.numel())
        assert torch.equal(w[~zero], w0[~zero])  # the kept weights unchanged
        assert w0[zero].abs().max() <= w0[~zero].abs().min()  # and the removed ones the smallest
        assert report[name] == pytest.approx(zero.float().mean().item())
    assert report["head"] == 0.0


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_sparsity_survives_fine_tuning(method):
    model = _gpt()
    fusedformer.prune(model, method, amount=0.5 if method == "magnitude" else None)
    zeros = {n: w == 0 for n, w in _weights(model).items()}
    before = _weights(model)
    losses = _fine_tune(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, w in _weights(model).items():
        assert torch.equal(w == 0, zeros[name]), name  # the pruned weights still zero, no others
        assert not torch.equal(w, before[name])  # and the kept ones trained


@pytest.mark.parametrize("method,n,m", [("2:4", 2, 4), ("n:m", 1, 4), ("n:m", 2, 8)])
def test_nm_pattern_in_every_group(method, n, m):
    model = _gpt()
    before = _weights(model)
    fusedformer.prune(model, method, n=n, m=m)
    _fine_tune(model, steps=1)
    for name, w in _weights(model).items():
        groups = w.view(w.shape[0], -1, m)
        assert ((groups != 0).sum(-1) == n).all(), name
        # the kept n of each group were its n largest
        w0 = before[name].abs().view_as(groups)
        smallest_kept = w0.masked_fill(groups == 0, float("inf")).min(-1).values
        largest_dropped = w0.masked_fill(groups != 0, -1.0).max(-1).values
        assert (smallest_kept >= largest_dropped).all(), name


def test_masks_round_trip_through_checkpoints_and_bake(tmp_path):
    model = _gpt()
    fusedformer.prune(model, "2:4")
    ids = _ids()
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert set(masked_layers(loaded)) == LAYERS
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    _fine_tune(loaded, steps=1)
    assert fusedformer.sparsity(loaded)["blocks.0.mlp.up"] == 0.5
    dense_keys = set(_gpt().state_dict())
    fusedformer.remove_masks(model)
    assert not masked_layers(model) and set(model.state_dict()) == dense_keys
    assert fusedformer.sparsity(model)["blocks.1.attn.qkv"] == 0.5
    permanent = fusedformer.prune(_gpt(), "magnitude", amount=0.25, permanent=True)
    assert not masked_layers(permanent) and fusedformer.sparsity(permanent)["blocks.0.attn.out"] == 0.25


def _masked_reference(model, kept):
    """The unshrunk model with the removed heads' output-projection columns and the removed neurons'
    down-projection columns zeroed: what structured pruning must compute."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for blk, k in zip(ref.blocks, kept):
            E, H = blk.attn.head_dim, blk.attn.n_head
            drop = torch.ones(H, dtype=torch.bool)
            drop[k["heads"]] = False
            blk.attn.out.weight[:, drop.repeat_interleave(E)] = 0
            drop = torch.ones(blk.mlp.down.in_features, dtype=torch.bool)
            drop[k["ffn"]] = False
            blk.mlp.down.weight[:, drop] = 0
    return ref


@pytest.mark.parametrize("shape", ["gpt2", "llama"])
def test_structured_equals_the_masked_model(shape, tmp_path):
    kw = dict(positions="rotary", norm="rmsnorm", activation="swiglu", attn_bias=False, out_bias=False,
              mlp_bias=False, tie_embeddings=False, d_ff=96) if shape == "llama" else {}
    model = _gpt(torch.float64, **kw)
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    D, E, d_ff, ff_parts = c.d_model, c.head_dim, c.d_ff, 2 if shape == "llama" else 1
    kept = structured.plan(model, heads=0.25, ffn=0.5)
    ref = _masked_reference(model, kept)
    fusedformer.prune(model, "structured", heads=0.25, ffn=0.5)
    assert (model.config.n_head, model.config.n_kv_head, model.config.head_dim, model.config.d_ff) == \
        (3, 3, E, d_ff // 2)
    # per layer: one head (q, k, v rows and out columns, with biases) and half the neurons gone
    head = 4 * D * E + (3 * E if c.attn_bias else 0)
    neuron = (ff_parts + 1) * D + (ff_parts if c.mlp_bias else 0)
    removed = c.n_layer * (head + d_ff // 2 * neuron)
    assert sum(p.numel() for p in model.parameters()) == n_params - removed
    ids = _ids()
    with torch.no_grad():
        got = model(ids)
        torch.testing.assert_close(got, ref(ids), rtol=1e-12, atol=1e-12)
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), got, rtol=0, atol=0)
    out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 9)
    assert all(torch.isfinite(torch.tensor(_fine_tune(model, steps=1))))


def test_structured_heads_or_ffn_alone_and_gqa():
    model = _gpt(n_head=4, n_kv_head=2, positions="rotary")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="grouped-query"):
        fusedformer.prune(model, "structured", heads=0.5)
    assert _unchanged(model, snap)
    fusedformer.prune(model, "structured", ffn=0.25)
    assert model.config.d_ff == 192 and model.config.n_head == 4
    model = _gpt()
    fusedformer.prune(model, "structured", heads=0.5)
    assert model.config.n_head == 2 and model.config.d_ff == 256
    with torch.no_grad():
        assert torch.isfinite(model(_ids())).all()


def test_errors_leave_the_model_unchanged():
    model = _gpt(d_model=66, n_head=3)
    snap = _snapshot(model)
    cases = [
        (dict(method="prunes"), ValueError, "method must be one of"),
        (dict(method="magnitude"), ValueError, "amount must be a fraction in \\(0, 1\\), got None"),
        (dict(method="magnitude", amount=0), ValueError, "amount must be a fraction"),
        (dict(method="magnitude", amount=1.0), ValueError, "amount must be a fraction"),
        (dict(method="magnitude", amount=0.5, skip=("blocks.7",)), ValueError, "skip names no module"),
        (dict(method="magnitude", amount=0.5, heads=0.5), ValueError, "heads and ffn apply to"),
        (dict(method="2:4"), ValueError, "in_features divisible by 4; not so for 'blocks.0.attn.qkv' \\(in_features 66\\)"),
        (dict(method="4:2"), ValueError, "0 < n < m"),
        (dict(method="structured"), ValueError, "needs heads and/or ffn"),
        (dict(method="structured", heads=1.5), ValueError, "heads must be a fraction"),
        (dict(method="structured", ffn=0.5, importance="taylor"), ValueError, "importance must be one of"),
        (dict(method="structured", heads=0.9), ValueError, "removes all 3 heads"),
        (dict(method="structured", heads=0.5, amount=0.5), ValueError, "amount applies to"),
    ]
    for kw, error, match in cases:
        method = kw.pop("method")
        with pytest.raises(error, match=match):
            fusedformer.prune(model, method, **kw)
        assert _unchanged(model, snap), (method, kw)
    # twice: 3 heads -> 2 -> removing 0.5 of 2 leaves 1 -> removing 0.75 of 1 would leave none
    fusedformer.prune(model, "structured", heads=0.34)
    fusedformer.prune(model, "structured", heads=0.5)
    assert model.config.n_head == 1
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="removes all 1 heads"):
        fusedformer.prune(model, "structured", heads=0.75)
    assert _unchanged(model, snap)


def test_structured_needs_a_gpt_and_a_dense_model():
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(TypeError, match="needs a fusedformer.models.GPT"):
        fusedformer.prune(seq, "structured", ffn=0.5)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fusedformer.prune("gpt", "magnitude", amount=0.5)
    fusedformer.prune(seq, "magnitude", amount=0.5)  # any torch model's linears can be masked
    assert fusedformer.sparsity(seq)["total"] == 0.5
    model = fusedformer.prune(_gpt(), "magnitude", amount=0.5)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="remove_masks"):
        fusedformer.prune(model, "structured", ffn=0.5)
    assert _unchanged(model, snap)

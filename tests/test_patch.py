"""fusedformer.patch on torch.nn models: what it converts, what it leaves alone, same numbers,
same parameters (an optimizer keeps working), patching twice."""

import copy
import warnings

import pytest
import torch

import fusedformer
import fusedformer.nn as fnn

D, H = 32, 4


class MyNorm(torch.nn.LayerNorm):
    """A user subclass: its forward may differ from torch's, so patch must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2.0


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = torch.nn.TransformerEncoderLayer(D, H, 64, dropout=0.0, batch_first=True, norm_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(D))
        self.attn = torch.nn.MultiheadAttention(D, H, batch_first=True)
        self.rms = torch.nn.RMSNorm(D)
        self.mine = MyNorm(D)
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x, pad):
        h = self.encoder(x, src_key_padding_mask=pad)
        a, w = self.attn(h, h, h, key_padding_mask=pad)  # need_weights=True by default
        return self.head(self.mine(self.rms(h + a))), w


def _model():
    torch.manual_seed(0)
    m = Model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _data():
    x = torch.randn(3, 6, D)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    return x, pad


def test_patch_converts_and_keeps_numbers():
    ref = _model()
    model = copy.deepcopy(ref)
    params = {n: p for n, p in model.named_parameters()}
    out = fusedformer.patch(model)
    assert out is model
    assert type(model.encoder) is fnn.TransformerEncoder
    assert all(type(layer) is fnn.TransformerEncoderLayer for layer in model.encoder.layers)
    assert type(model.encoder.layers[0].self_attn) is fnn.MultiheadAttention
    assert type(model.encoder.norm) is fnn.LayerNorm
    assert type(model.attn) is fnn.MultiheadAttention
    assert type(model.rms) is fnn.RMSNorm
    assert type(model.mine) is MyNorm  # subclasses are left alone
    assert type(model.head) is torch.nn.Linear
    assert all(p is params[n] for n, p in model.named_parameters())  # same parameter objects
    assert list(model.state_dict()) == list(ref.state_dict())

    counts = model.fusedformer_summary.counts()
    assert counts["torch.nn.TransformerEncoderLayer -> fusedformer.nn.TransformerEncoderLayer"] == 2
    assert counts["torch.nn.LayerNorm -> fusedformer.nn.LayerNorm"] == 5
    assert counts["torch.nn.MultiheadAttention -> fusedformer.nn.MultiheadAttention"] == 3
    assert counts["torch.nn.RMSNorm -> fusedformer.nn.RMSNorm"] == 1
    assert "replaced 12 module(s)" in str(model.fusedformer_summary)

    x, pad = _data()
    (y, w), (y_ref, w_ref) = model(x, pad), ref(x, pad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)


def test_patch_twice_is_harmless():
    model = fusedformer.patch(_model())
    x, pad = _data()
    before = model(x, pad)[0]
    fusedformer.patch(model)
    assert len(model.fusedformer_summary) == 0
    assert model.fusedformer_summary.already_fused == 12
    torch.testing.assert_close(model(x, pad)[0], before)


def test_optimizer_survives_patch():
    """The parameters are the same objects, so an optimizer built before patching keeps training
    the patched model, step for step like the unpatched one."""
    ref = _model()
    model = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fusedformer.patch(model)
    x, pad = _data()
    target = torch.randn(3, 6, 3)
    for m, opt_m in ((ref, opt_ref), (model, opt)):
        for _ in range(3):
            opt_m.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x, pad)[0], target)
            loss.backward()
            opt_m.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_patch_a_single_module_and_bad_input():
    norm = torch.nn.LayerNorm(8)
    assert type(fusedformer.patch(norm)) is fnn.LayerNorm
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fusedformer.patch("not a model")


def test_patch_is_the_function():
    import fusedformer.patch as mod  # importing the submodule must not shadow the function

    assert callable(fusedformer.patch)
    assert fusedformer.patch.__module__ == "fusedformer.patch"
    assert mod is not None


def test_readme_example_runs():
    """The README's drop-in example runs as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Drop-in modules", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})

"""Distillation: the mixed loss against its formula, its errors, and `python -m fusedformer distill`:
a student distilled from the shipped model beats the same student trained on the data alone (alpha 0)
for the same steps on held-out perplexity; the command's user errors."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from fusedformer import cli
from fusedformer.distill import distill_loss
from fusedformer.textgen import SHIPPED_MODEL
from fusedformer.train import TrainConfig, train


def test_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5), generator=g)
    T, a = 1.7, 0.3
    ps, pt = F.log_softmax(s / T, -1), F.softmax(t / T, -1)
    kl = (pt * (pt.log() - ps)).sum(-1).mean()  # per token, averaged over the 10 tokens
    want = a * T * T * kl + (1 - a) * F.cross_entropy(s.flatten(0, 1), y.flatten())
    torch.testing.assert_close(distill_loss(s, t, y, T, a).double(), want, rtol=1e-5, atol=1e-6)
    # alpha 0: the data's cross-entropy alone; alpha 1 with the teacher's own logits: zero
    torch.testing.assert_close(distill_loss(s, t, y, T, 0.0).double(), F.cross_entropy(s.flatten(0, 1), y.flatten()),
                               rtol=1e-6, atol=1e-6)
    assert distill_loss(t, t, y, T, 1.0).abs().item() < 1e-6


def test_loss_errors():
    s, y = torch.randn(4, 7), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, s, y, 0.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(s, s, y, 1.0, 1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        distill_loss(s, torch.randn(4, 8), y, 1.0, 0.5)


def _student(tmp_path, alpha):
    cfg = TrainConfig(out=str(tmp_path / f"alpha{alpha}"), teacher=SHIPPED_MODEL, alpha=alpha, temperature=2.0,
                      n_layer=1, d_model=64, n_head=2, context=32, steps=25, batch_size=8, lr=3e-3, warmup=5,
                      eval_every=1000, eval_batches=4, max_chars=50_000, progress=False, save_dtype="float32")
    return train(cfg, log=lambda *a, **k: None)


def test_distilled_student_beats_the_same_student_trained_on_the_data(tmp_path):
    distilled = _student(tmp_path, 0.8)
    scratch = _student(tmp_path, 0.0)  # the same model, data, batches and steps, no teacher term
    assert distilled["heldout_perplexity"] < 0.95 * scratch["heldout_perplexity"], (distilled, scratch)
    with open(tmp_path / "alpha0.8" / "metrics.json") as f:
        m = json.load(f)
    assert m["summary"]["config"]["teacher"] == SHIPPED_MODEL and m["heldout"]["perplexity"] > 1
    with open(tmp_path / "alpha0.8" / "config.json") as f:
        c = json.load(f)
    assert (c["n_layer"], c["d_model"]) == (1, 64)
    assert os.path.isfile(tmp_path / "alpha0.8" / "loss.png")


@pytest.mark.parametrize("argv, match", [
    (["distill", "--teacher", "/nonexistent-teacher"], "--teacher"),
    (["distill", "--teacher", SHIPPED_MODEL, "--context", "100000", "--steps", "1"], "teacher's context"),
    (["distill", "--teacher", SHIPPED_MODEL, "--alpha", "1.5"], "--alpha"),
    (["distill", "--teacher", SHIPPED_MODEL, "--student-dim", "65", "--student-heads", "2"], "--d-model"),
])
def test_command_errors(argv, match, capsys, tmp_path):
    try:
        rc = cli.main(argv + ["--out", str(tmp_path / "run"), "--no-progress"])
    except SystemExit as e:
        rc = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], (rc, err)

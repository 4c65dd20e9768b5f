"""Resumable, crash-safe training: 20 steps in one run equal 10 steps + --resume + 10; a process killed
(SIGKILL) in the middle of writing the training state leaves the previous state loadable and
resumable; Ctrl-C (SIGINT) saves the state and exits with a message and status 130."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedformer import cli
from fusedformer.checkpointing import STATE_NAME, atomic_write_text, load_training_state
from fusedformer.errors import UserError
from fusedformer.models import GPT
from fusedformer.train import TrainConfig, train

TINY = dict(vocab_size=300, context=16, d_model=32, n_layer=1, n_head=2, batch_size=4, warmup=3, eval_every=5,
            eval_batches=1, lr=3e-3, progress=False, save_dtype="float32")


def _corpus(folder):
    folder.mkdir()
    for k in range(6):
        (folder / f"m{k}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {k}\n\n" for i in range(30)))
    return str(folder)


def _quiet(*args, **kwargs):
    pass


def test_resume_continues_exactly(tmp_path):
    data = _corpus(tmp_path / "data")
    full = train(TrainConfig(data=data, out=str(tmp_path / "full"), steps=20, **TINY), log=_quiet)
    part = train(TrainConfig(data=data, out=str(tmp_path / "part"), steps=20, **TINY), log=_quiet, stop_after=10)
    assert part["interrupted"] and part["step"] == 10
    assert load_training_state(str(tmp_path / "part"))["step"] == 10
    resumed = train(TrainConfig(data=data, out=str(tmp_path / "part"), steps=20, resume=True, **TINY), log=_quiet)
    assert resumed["resumed_at"] == 10
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]
    b = json.loads((tmp_path / "part" / "metrics.json").read_text())["history"]
    assert [h["step"] for h in b["train"]] == list(range(1, 21))
    for x, y in zip(a["train"] + a["val"], b["train"] + b["val"]):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), (x, y)
    ma, mb = GPT.from_pretrained(str(tmp_path / "full")), GPT.from_pretrained(str(tmp_path / "part"))
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    # a resumed run that changes the model is refused; one with nothing to resume from too
    with pytest.raises(UserError, match="differs from the run being resumed"):
        train(TrainConfig(data=data, out=str(tmp_path / "part"), steps=20, resume=True, **{**TINY, "d_model": 64}),
              log=_quiet)
    with pytest.raises(UserError, match="no training_state.pt"):
        train(TrainConfig(data=data, out=str(tmp_path / "none"), resume=True, **TINY), log=_quiet)


_DIE_DURING_SECOND_SAVE = textwrap.dedent("""
    import io, os, signal, sys, torch
    real_save = torch.save
    calls = []
    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second training state: write half of it, then die as a kill -9 would
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = dying_save
    from fusedformer.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _train_args(data, out, steps):
    return ["train", "--data", data, "--out", out, "--steps", str(steps), "--vocab-size", "300", "--context", "16",
            "--d-model", "32", "--n-layer", "1", "--n-head", "2", "--batch-size", "4", "--warmup", "3",
            "--eval-every", "5", "--eval-batches", "1", "--save-dtype", "float32", "--no-progress"]


@pytest.mark.timeout(300)
def test_kill_during_save_leaves_previous_state_loadable(tmp_path):
    data, out = _corpus(tmp_path / "data"), str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", _DIE_DURING_SECOND_SAVE] + _train_args(data, out, 20),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stderr
    leftovers = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert leftovers, "the killed writer left no partial file: the fault was not injected mid-write"
    state = load_training_state(out)  # the previous one, whole
    assert state["step"] == 5
    assert GPT.from_pretrained(out).config.d_model == 32
    # and the run resumes from it to the end
    rc = cli.main(_train_args(data, out, 20) + ["--resume"])
    assert rc == 0
    assert load_training_state(out)["step"] == 20
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    m = json.loads(open(os.path.join(out, "metrics.json")).read())
    assert [h["step"] for h in m["history"]["train"]] == list(range(1, 21))


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_text(str(p), "old")

    class Boom(Exception):
        pass

    from fusedformer.checkpointing import atomic_open

    with pytest.raises(Boom):
        with atomic_open(str(p), "w") as f:
            f.write("new, half writ")
            raise Boom
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


@pytest.mark.timeout(300)
def test_ctrl_c_saves_and_exits(tmp_path):
    data, out = _corpus(tmp_path / "data"), str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-u", "-m", "fusedformer"] + _train_args(data, out, 100000),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:  # wait until it trains: the first evaluation is printed at step 5
        lines.append(line)
        if line.startswith("step 5:"):
            break
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=240)
    text = "".join(lines) + rest
    assert p.returncode == 130, text
    assert "interrupted at step" in text and "--resume" in text and "Traceback" not in text
    state = load_training_state(out)
    assert 5 <= state["step"] < 100000
    assert len(state["history"]["train"]) == state["step"]

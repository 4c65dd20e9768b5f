"""`torchrun --nproc-per-node 2 -m fusedformer train` (gloo, CPU): two processes, each reading its half
of every global batch from the shards, follow the loss curve of one process with the same global
batch (and of one process accumulating two micro-batches); only rank 0 writes the run folder."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from fusedformer import shards

STEPS = 6


def _run(args, env_extra=None, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _train_args(data_dir, out, batch, accum=1):
    return ["-m", "fusedformer", "train", "--data-dir", data_dir, "--out", out, "--context", "16", "--d-model", "32",
            "--n-layer", "1", "--n-head", "2", "--steps", str(STEPS), "--batch-size", str(batch), "--grad-accum",
            str(accum), "--warmup", "2", "--eval-every", "3", "--eval-batches", "2", "--lr", "3e-3", "--no-progress",
            "--device", "cpu"]


def _losses(out):
    h = json.loads(open(os.path.join(out, "metrics.json")).read())["history"]
    return [x["loss"] for x in h["train"]], [x["loss"] for x in h["val"]]


@pytest.mark.timeout(600)
def test_torchrun_two_processes_match_one(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    data = tmp_path / "data"
    data.mkdir()
    for k in range(8):
        (data / f"{k}.txt").write_text("".join(f"{k} {i} the quick brown fox {i * k}\n" for i in range(60)))
    sh = str(tmp_path / "shards")
    shards.prepare(str(data), sh, tokenizer="char", log=lambda *a: None)

    one = str(tmp_path / "one")
    _run([sys.executable] + _train_args(sh, one, batch=8))
    two = str(tmp_path / "two")
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
             + _train_args(sh, two, batch=4))
    accum = str(tmp_path / "accum")
    _run([sys.executable] + _train_args(sh, accum, batch=4, accum=2))

    t1, v1 = _losses(one)
    t2, v2 = _losses(two)
    ta, va = _losses(accum)
    assert len(t1) == len(t2) == len(ta) == STEPS and len(v1) == len(v2) == 2
    for a, b, c in zip(t1 + v1, t2 + v2, ta + va):
        assert abs(a - b) <= 1e-4 * abs(a) + 1e-5, (t1, t2)
        assert abs(a - c) <= 1e-4 * abs(a) + 1e-5, (t1, ta)
    assert t1[-1] < t1[0]
    m = json.loads(open(os.path.join(two, "metrics.json")).read())["summary"]
    assert m["processes"] == 2 and m["config"]["batch_size"] == 4
    assert "global batch 8 = 4 x 1 accumulation x 2 processes" in r.stdout
    # rank 0 alone logs: the summary line is printed once
    assert r.stdout.count("held-out loss") - r.stdout.count("step ") == 1

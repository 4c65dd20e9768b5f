"""The char-level baby GPT on the Shakespeare plays, whole runs side by side (bench/results/
cpu-train-shakespeare.{json,md,png}):

1. ``python -m fusedformer train --preset shakespeare-char`` as a user runs it (its own wall time and
   validation loss, a loss curve, a sample);
2. the same training loop (the preset's batch sampler, warmup + cosine schedule, AdamW, clipping, an
   evaluation every 250 steps on the same held-out windows) for 2000 iterations with the fusedformer
   GPT as the preset runs it (torch's fused AdamW, bfloat16 matrix products), the same model in plain
   PyTorch eager as nanoGPT runs it on a CPU (bench_train.PlainGPT; AdamW's default loop, float32
   products), that model with the preset's two switches turned on, and under torch.compile, all
   from the same initial weights: wall time, step rate and final validation loss;
3. (before the torch.compile run, the slowest) the same command under ``torchrun --nproc-per-node 2`` (batch 6 per process, the same global batch
   12) against 1 process, for --torchrun-steps steps: the step rates (on a 2-core machine no speed-up is
   expected; the point is that it scales out).

    python bench/train_shakespeare.py [--plays data/shakespeare] [--steps 2000] [--skip-compile]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_train import BABY, baby_gpt_pair  # noqa: E402
from common import machine_info  # noqa: E402

from fusedformer import shakespeare, shards  # noqa: E402
from fusedformer.train import (PRESETS, TrainConfig, _windows, evaluate, lr_at, make_optimizer,  # noqa: E402
                               matmul_precision_scope)


def run_loop(model, loss_fn, train_ids, val_ids, cfg, label, fused=None, bf16_matmul=False):
    """The training loop of `train` (single process), returning times and losses; ``fused`` and
    ``bf16_matmul`` as make_optimizer's and TrainConfig's."""
    with matmul_precision_scope(bf16_matmul):
        return _loop(model, loss_fn, train_ids, val_ids, cfg, label, make_optimizer(model, cfg, fused=fused))


def _loop(model, loss_fn, train_ids, val_ids, cfg, label, opt):
    g = torch.Generator().manual_seed(cfg.seed)
    T = cfg.context
    n = train_ids.numel() - T - 1
    curve, vals = [], []
    model.train()
    t0 = time.perf_counter()
    eval_s = 0.0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        w = _windows(train_ids, torch.randint(0, n, (cfg.batch_size,), generator=g), T + 1)
        loss = loss_fn(w[:, :-1], w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        curve.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            te = time.perf_counter()
            vals.append({"step": step + 1, "loss": _val_loss(loss_fn, val_ids, T, cfg.eval_batches)})
            eval_s += time.perf_counter() - te
            print(f"{label}: step {step + 1}, train {curve[-1]:.3f}, val {vals[-1]['loss']:.3f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "eval_s": eval_s, "steps_per_s": cfg.steps / (wall - eval_s), "final_val_loss": vals[-1]["loss"],
            "final_train_loss": sum(curve[-50:]) / len(curve[-50:]), "val": vals, "train_curve": curve[::10]}


@torch.no_grad()
def _val_loss(loss_fn, ids, T, n_batches, batch_size=16):
    n_win = min(n_batches * batch_size, (ids.numel() - 1) // T)
    starts = torch.linspace(0, ids.numel() - T - 1, n_win).long()
    tot = 0.0
    for i in range(0, n_win, batch_size):
        w = _windows(ids, starts[i:i + batch_size], T + 1)
        tot += loss_fn(w[:, :-1], w[:, 1:]).item() * w.shape[0]
    return tot / n_win


def _cli(args, env=None):
    r = subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    return r.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plays", default="data/shakespeare", help="output of `data shakespeare` (fetched if missing)")
    ap.add_argument("--steps", type=int, default=BABY["steps"], help="iterations of the train command (default 2000)")
    ap.add_argument("--loop-steps", type=int, default=None,
                    help="iterations of each run of the loop comparison (default: --steps)")
    ap.add_argument("--reuse-command", default=None,
                    help="a results JSON of an earlier run whose train-command figures to keep instead of running it")
    ap.add_argument("--torchrun-steps", type=int, default=200, help="steps of the 1- vs 2-process comparison")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile peer")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    args = ap.parse_args(argv)

    if not os.path.isdir(args.plays):
        shakespeare.fetch(args.plays)
    work = tempfile.mkdtemp(prefix="bench-shakespeare-")
    sh = os.path.join(work, "shards")
    index = shards.prepare(args.plays, sh, tokenizer="char")
    train_ids = shards.TokenStream(sh, "train").to_tensor()
    val_ids = shards.TokenStream(sh, "val").to_tensor()
    cfg = TrainConfig(**{**{k: v for k, v in BABY.items() if k in TrainConfig.__dataclass_fields__},
                         "steps": args.steps})
    results = {"machine": machine_info("cpu"), "config": {**BABY, "steps": args.steps},
               "corpus": {"plays": index["train"]["documents"] + index["val"]["documents"],
                          "train_tokens": index["train"]["tokens"], "val_tokens": index["val"]["tokens"],
                          "val_plays": index["val"]["documents"], "vocab_size": index["vocab_size"]},
               "note": "a 2-core machine shared with other jobs while this ran: absolute times are noisy"}

    # 1. the train command as users run it
    if args.reuse_command:
        with open(args.reuse_command) as f:
            results["train_command"] = json.load(f)["train_command"]
    else:
        _train_command(args, sh, work, results)
    _save(results, args.out)

    # 2. the same loop, three implementations, same initial weights
    cfg.steps = args.loop_steps or args.steps
    results["loop_steps"] = cfg.steps
    V = index["vocab_size"]

    ours, plain = baby_gpt_pair(vocab=V)
    runs = {}
    results["loop"] = runs
    # plain PyTorch as nanoGPT runs it on a CPU (AdamW's default loop, float32 products); ours as the
    # preset runs (fused AdamW, bfloat16 products); then plain with those two switches turned on
    runs["plain PyTorch eager"] = run_loop(plain, plain, train_ids, val_ids, cfg, "eager", fused=False)
    _save(results, args.out)
    runs["fusedformer"] = run_loop(ours, ours.loss, train_ids, val_ids, cfg, "fusedformer",
                                   bf16_matmul=cfg.bf16_matmul)
    _ratios(runs)
    _save(results, args.out)
    _, tuned = baby_gpt_pair(vocab=V)
    runs["plain PyTorch eager, fused AdamW + bf16 matmul"] = run_loop(tuned, tuned, train_ids, val_ids, cfg, "tuned",
                                                                      fused=True, bf16_matmul=True)
    _ratios(runs)
    _save(results, args.out)
    # 3. torchrun: 2 processes x batch 6 against 1 process x batch 12
    tr = {}
    for nproc in (1, 2):
        o = os.path.join(work, f"tr{nproc}")
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        _cli(launcher + ["-m", "fusedformer", "train", "--preset", "shakespeare-char", "--data-dir", sh, "--out", o,
                         "--steps", str(args.torchrun_steps), "--eval-every", str(args.torchrun_steps),
                         "--batch-size", str(12 // nproc), "--device", "cpu", "--no-progress"])
        s = json.load(open(os.path.join(o, "metrics.json")))["summary"]
        tr[f"{nproc} process{'es' if nproc > 1 else ''}"] = {"steps_per_s": s["steps_per_s"],
                                                            "final_train_loss": s["final_train_loss"],
                                                            "threads_per_process": "OMP_NUM_THREADS=1 (torchrun's default)"
                                                            if nproc > 1 else str(torch.get_num_threads())}
    results["torchrun"] = tr
    _save(results, args.out)

    if not args.skip_compile:
        _, plain2 = baby_gpt_pair(vocab=V)
        try:
            compiled = torch.compile(plain2)
            runs["plain PyTorch + torch.compile"] = run_loop(plain2, compiled, train_ids, val_ids, cfg, "compile",
                                                             fused=False)
            runs["plain PyTorch + torch.compile"]["note"] = "wall_s includes compiling; steps_per_s too"
        except Exception as e:  # no compiler on this machine: report it and go on
            results["compile_error"] = f"{type(e).__name__}: {e}"[:500]
    _ratios(runs)
    _save(results, args.out)

    md = "\n".join(["# baby GPT (char-level) on the Shakespeare plays", "",
                    ", ".join(f"{k}: {v}" for k, v in results["machine"].items()), "", render(results)])
    with open(os.path.join(args.out, "cpu-train-shakespeare.md"), "w") as f:
        f.write(md)
    _plot(runs, os.path.join(args.out, "cpu-train-shakespeare.png"))
    print(md)


def render(results):
    """The result's Markdown body (its tables and sample), from the JSON alone (bench/report.py uses it)."""
    runs, tr, tc = results["loop"], results.get("torchrun", {}), results["train_command"]
    md = [results["note"], "",
          f"| run | wall s ({results['loop_steps']} it.) | steps/s (without evals) | vs eager | final val loss |",
          "|---|---|---|---|---|"]
    for k, r in runs.items():
        md.append(f"| {k} | {r['wall_s']:.0f} | {r['steps_per_s']:.1f} | {r['step_rate_vs_eager']:.2f}x | "
                  f"{r['final_val_loss']:.3f} |")
    md += ["", f"`train --preset shakespeare-char`: {tc['train_seconds']:.0f} s training, val loss {tc['val_loss']:.3f}",
           "", "torchrun: " + ", ".join(f"{k}: {v['steps_per_s']:.1f} steps/s" for k, v in tr.items()), "",
           "Sample:", "", "```", tc["sample"].rstrip("\n"), "```", ""]
    return "\n".join(md)


def _train_command(args, sh, work, results):
    out = os.path.join(work, "run")
    stdout = _cli(["-m", "fusedformer", "train", "--preset", "shakespeare-char", "--data-dir", sh, "--out", out,
                   "--steps", str(args.steps), "--no-progress"])
    m = json.load(open(os.path.join(out, "metrics.json")))
    sample = _cli(["-m", "fusedformer", "generate", "--model", out, "--prompt", "ROMEO.\n", "--max-new-tokens", "63",
                   "--seed", "1"])
    results["train_command"] = {"train_seconds": m["summary"]["train_seconds"],
                                "total_seconds": m["summary"]["total_seconds"],
                                "steps_per_s": m["summary"]["steps_per_s"], "val_loss": m["summary"]["heldout_loss"],
                                "val_curve": m["history"]["val"], "sample": sample,
                                # the run's temporary folder named as $WORK, not as this machine's path
                                "log": [line.replace(work, "$WORK") for line in stdout.splitlines()[-12:]]}
    import shutil

    os.makedirs(args.out, exist_ok=True)
    shutil.copy(os.path.join(out, "loss.png"), os.path.join(args.out, "cpu-train-shakespeare-loss.png"))


def _ratios(runs):
    base = runs["plain PyTorch eager"]["steps_per_s"]
    for r in runs.values():
        r["step_rate_vs_eager"] = r["steps_per_s"] / base


def _save(results, out):
    """Write what has been measured so far (each stage takes minutes)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cpu-train-shakespeare.json"), "w") as f:
        json.dump(results, f, indent=1)


def _plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k, r in runs.items():
        ax.plot([v["step"] for v in r["val"]], [v["loss"] for v in r["val"]], "o-",
                label=f"{k}: {r['wall_s']:.0f} s, val {r['final_val_loss']:.3f}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("baby GPT on Shakespeare: same loop, same initial weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""``python -m fusedformer train``: a small GPT trained on a text corpus (by default the Python standard
library's source files) with a byte-level BPE tokenizer; AdamW, cross-entropy, gradient clipping, linear
warmup then cosine decay, held-out perplexity against a unigram baseline, a loss-curve PNG, checkpoints."""

import dataclasses
import json
import math
import os
import platform
import time
from typing import Optional

import torch
import torch.nn.functional as F

from . import corpus
from .models import GPT, GPTConfig


@dataclasses.dataclass
class TrainConfig:
    out: str = "runs/gpt"
    data: Optional[str] = None  # a folder of text files; None: the standard library's source
    max_chars: Optional[int] = None  # read at most this many characters of the corpus
    vocab_size: int = 4096
    context: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 8
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 16
    save_dtype: str = "bfloat16"  # dtype of the saved weights (bfloat16 halves the file; loading casts back)
    seed: int = 0
    progress: bool = True


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model, cfg: TrainConfig):
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def batch_windows(ids: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    """Random windows: inputs (B, T) and next-token targets (B, T)."""
    if ids.numel() < context + 2:
        raise ValueError(f"train: the corpus has {ids.numel()} tokens, fewer than context + 2 = {context + 2}")
    starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def lm_loss(model, x, y):
    """Mean next-token cross-entropy: the model's fused head + loss where it has one (GPT.loss)."""
    if hasattr(model, "loss"):
        return model.loss(x, y)
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


def train_step(model, opt, x, y, grad_clip):
    """One optimisation step; returns the loss (a float)."""
    loss = lm_loss(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, ids, context, n_batches, batch_size=16):
    """Mean cross-entropy over fixed, evenly spaced windows of the held-out ids."""
    model.eval()
    n_win = max(1, min(n_batches * batch_size, (ids.numel() - 1) // context))
    starts = torch.linspace(0, ids.numel() - context - 1, n_win).long()
    total, count = 0.0, 0
    for i in range(0, n_win, batch_size):
        s = starts[i:i + batch_size]
        w = ids[s[:, None] + torch.arange(context + 1)]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def plot_losses(history, path, unigram_loss=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history["train"]]
    loss = [h["loss"] for h in history["train"]]
    k = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(steps, smooth, color="tab:blue", label="training loss")
    if history["val"]:
        ax.plot([h["step"] for h in history["val"]], [h["loss"] for h in history["val"]], "o-", color="tab:orange",
                label="held-out loss")
    if unigram_loss is not None:
        ax.axhline(unigram_loss, color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("fusedformer GPT training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stdlib_heldout_files():
    """The held-out files of the standard-library corpus: the list the shipped model was evaluated on
    (in its metrics.json), relative to the standard library's folder."""
    from .textgen import SHIPPED_MODEL

    with open(os.path.join(SHIPPED_MODEL, "metrics.json")) as f:
        return json.load(f)["heldout"]["files"]


def prepare_data(cfg: TrainConfig, log=print):
    """Tokenizer, training ids, held-out ids and the held-out files' names (relative to the corpus root)."""
    from .tokenizer import train_bpe

    files = corpus.folder_files(cfg.data) if cfg.data else corpus.default_corpus_files()
    root = cfg.data or corpus.stdlib_root()
    train_files, val_files = corpus.split_files(files, None if cfg.data else stdlib_heldout_files(), root)
    train_texts = corpus.read_texts(train_files, cfg.max_chars)
    val_texts = corpus.read_texts(val_files, cfg.max_chars and max(1, cfg.max_chars // corpus.HELDOUT_EVERY))
    log(f"corpus: {len(train_files)} training and {len(val_files)} held-out files, "
        f"{sum(map(len, train_texts)) / 1e6:.1f} M training characters ({cfg.data or 'the Python standard library'})")
    tok = train_bpe(train_texts, cfg.vocab_size)
    train_ids = corpus.encode_stream(tok, train_texts)
    val_ids = corpus.encode_stream(tok, val_texts)
    log(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens; {train_ids.numel() / 1e6:.2f} M training and "
        f"{val_ids.numel() / 1e6:.2f} M held-out tokens")
    return tok, train_ids, val_ids, corpus.relative_names(val_files, root)


def heldout_report(model, tok, train_ids, val_ids, files, context, n_batches, data=None):
    """The held-out evaluation a checkpoint ships with (``metrics.json["heldout"]``): perplexity on
    fixed windows of the held-out ids, the unigram baseline of the training ids, and what they were
    computed on, so that a test can recompute the perplexity and a later run use the same split."""
    loss = evaluate(model, val_ids, context, n_batches)
    return {"perplexity": math.exp(loss), "loss": loss,
            "unigram_perplexity": corpus.unigram_perplexity(train_ids, val_ids, tok.get_vocab_size()),
            "context": context, "eval_batches": n_batches, "tokens": int(val_ids.numel()),
            "corpus": data or f"python {platform.python_version()} standard library", "files": files}


def train(cfg: TrainConfig, log=print):
    """Train, evaluate, save; returns a summary dict (also written to ``<out>/metrics.json``)."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tok, train_ids, val_ids, val_files = prepare_data(cfg, log)
    V = tok.get_vocab_size()
    context = min(cfg.context, max(8, val_ids.numel() - 2))
    model = GPT(GPTConfig(vocab_size=V, n_positions=cfg.context, d_model=cfg.d_model, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context {cfg.context}, "
        f"{n_params / 1e6:.2f} M parameters")
    unigram = corpus.unigram_perplexity(train_ids, val_ids, V)
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    history = {"train": [], "val": []}
    os.makedirs(cfg.out, exist_ok=True)
    model.train()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="train", unit="step", dynamic_ncols=True)
    t_train = time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = batch_windows(train_ids, cfg.batch_size, context, g)
        loss = train_step(model, opt, x, y, cfg.grad_clip)
        if not math.isfinite(loss):
            raise RuntimeError(f"train: the loss became {loss} at step {step}; lower --lr")
        history["train"].append({"step": step + 1, "loss": loss})
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            val = evaluate(model, val_ids, context, cfg.eval_batches)
            history["val"].append({"step": step + 1, "loss": val})
            (bar.write if bar is not None else log)(
                f"step {step + 1}: training loss {loss:.3f}, held-out loss {val:.3f}, perplexity {math.exp(val):.1f} "
                f"(unigram {unigram:.1f}), {time.time() - t_train:.0f} s")
            model.save_pretrained(cfg.out, tokenizer=tok, dtype=getattr(torch, cfg.save_dtype))
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_at(step, cfg):.2e}")
            bar.update(1)
    if bar is not None:
        bar.close()
    train_s = time.time() - t_train
    heldout = heldout_report(model, tok, train_ids, val_ids, val_files, context, cfg.eval_batches, cfg.data)
    summary = {"steps": cfg.steps, "tokens_seen": cfg.steps * cfg.batch_size * context,
               "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
               "final_train_loss": history["train"][-1]["loss"], "heldout_loss": heldout["loss"],
               "heldout_perplexity": heldout["perplexity"], "unigram_perplexity": unigram, "parameters": n_params,
               "vocab_size": V, "config": dataclasses.asdict(cfg)}
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump({"summary": summary, "heldout": heldout, "history": history}, f, indent=1)
    plot_losses(history, os.path.join(cfg.out, "loss.png"), math.log(unigram))
    log(f"held-out perplexity {summary['heldout_perplexity']:.2f} vs unigram baseline {unigram:.2f}; "
        f"{train_s:.0f} s training; saved to {cfg.out}")
    return summary

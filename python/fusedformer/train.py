"""``python -m fusedformer train``: a small GPT trained on a text corpus (by default the Python standard
library's source files, tokenized with a byte-level BPE tokenizer; or a folder of text files; or
token shards made by ``python -m fusedformer prepare``, read by memory map); AdamW, cross-entropy,
gradient clipping, linear warmup then cosine decay, gradient accumulation, bf16 autocast, held-out
perplexity against a unigram baseline, a loss-curve PNG.

Runs are resumable and crash-safe: ``training_state.pt`` (model, optimizer, step, the batch
generator's and torch's RNG states, loss history) is written atomically every ``save_every`` steps,
at the end and on Ctrl-C, and ``--resume`` continues the run exactly where it stopped. Under
``torchrun --nproc-per-node N`` it runs DistributedDataParallel: every step draws one global batch of
windows from a generator every process shares, each process reads only its own slice of it, and
the gradients are averaged, so N processes follow the loss curve of one process with the same
global batch; only rank 0 writes files and logs."""

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import corpus
from . import distributed as D
from .checkpointing import (STATE_NAME, atomic_write_text, load_training_state, remove_stale_temporaries,
                            save_pretrained_atomic, save_training_state)
from .errors import UserError
from .models import GPT, GPTConfig


@dataclasses.dataclass
class TrainConfig:
    out: str = "runs/gpt"
    data: Optional[str] = None  # a folder of text files; None: the standard library's source
    data_dir: Optional[str] = None  # token shards made by `prepare` (read by memory map)
    tokenizer: str = "bpe"  # for `data`: "bpe" (vocab_size tokens) or "char"
    max_chars: Optional[int] = None  # read at most this many characters of the corpus
    vocab_size: int = 4096
    context: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 8
    dropout: float = 0.0
    steps: int = 2000
    batch_size: int = 16  # sequences per process per micro-step; global batch = batch_size * grad_accum * processes
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 16
    save_every: Optional[int] = None  # None: every eval_every steps
    save_dtype: str = "bfloat16"  # dtype of the saved weights (bfloat16 halves the file; loading casts back)
    bf16: bool = False  # bfloat16 autocast for forward and loss
    # float32 training with bfloat16 matrix products (CPU with AVX512-BF16; TF32 on CUDA): see MATMUL_BF16
    bf16_matmul: bool = False
    device: Optional[str] = None  # None: CUDA when available, else the CPU
    seed: int = 0
    resume: bool = False
    progress: bool = True
    # distillation (python -m fusedformer distill): the teacher's checkpoint folder, the softmax
    # temperature and the weight of the teacher's term against the data's (fusedformer.distill)
    teacher: Optional[str] = None
    temperature: float = 2.0
    alpha: float = 0.5


# The configuration of nanoGPT's character-level "baby GPT" on Shakespeare for the CPU.
PRESETS = {
    "shakespeare-char": dict(tokenizer="char", context=64, d_model=128, n_layer=4, n_head=4, dropout=0.0, steps=2000,
                             batch_size=12, lr=1e-3, min_lr_ratio=0.1, warmup=100, beta2=0.99, weight_decay=0.1,
                             eval_every=250, eval_batches=20, save_dtype="float32", bf16_matmul=True),
}

# Fields a resumed run may change (the rest define the run and must stay as saved).
RESUMABLE_CHANGES = ("steps", "eval_every", "eval_batches", "save_every", "progress", "device", "save_dtype",
                     "bf16_matmul")

# torch's float32 matmul precision under bf16_matmul, per backend: the CPU's products round their
# operands to bfloat16 and sum in float32 (fusedformer.ops.linear.bf16_products: twice the float32
# rate with AVX512-BF16), CUDA's take TF32. Weights, activations, norms, attention and the optimizer
# stay float32.
MATMUL_BF16 = {"mkldnn": "bf16", "cuda": "tf32"}


def set_matmul_precision(precision: dict) -> None:
    """Set torch's float32 matmul precision per backend (``MATMUL_BF16``'s form); a torch without the
    per-backend setting keeps its own."""
    for b, p in precision.items():
        m = getattr(torch.backends, b).matmul
        if hasattr(m, "fp32_precision"):
            m.fp32_precision = p


@contextlib.contextmanager
def matmul_precision_scope(bf16: bool = False):
    """A block with ``MATMUL_BF16``'s precision where ``bf16``; on leaving it, torch's float32 matmul
    precision is what it was on entering, whatever the block set."""
    backends = {b: getattr(torch.backends, b).matmul for b in MATMUL_BF16}
    saved = {b: m.fp32_precision for b, m in backends.items() if hasattr(m, "fp32_precision")}
    if bf16:
        set_matmul_precision(MATMUL_BF16)
    try:
        yield
    finally:
        set_matmul_precision(saved)


def fused_adamw_ok(params) -> bool:
    """Whether torch's fused AdamW takes these parameters: floating tensors on the CPU or CUDA."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def check_config(cfg: TrainConfig):
    """UserError for values no run can use."""
    positive = ("vocab_size", "context", "d_model", "n_layer", "n_head", "steps", "batch_size", "grad_accum",
                "eval_every", "eval_batches")
    for name in positive:
        v = getattr(cfg, name)
        if not isinstance(v, int) or v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer; got {v}")
    if cfg.save_every is not None and cfg.save_every <= 0:
        raise UserError(f"--save-every must be a positive integer; got {cfg.save_every}")
    if cfg.max_chars is not None and cfg.max_chars <= 0:
        raise UserError(f"--max-chars must be a positive integer; got {cfg.max_chars}")
    for name in ("warmup",):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be 0 or more; got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number; got {cfg.lr}")
    for name in ("weight_decay", "grad_clip"):
        if not getattr(cfg, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more; got {getattr(cfg, name)}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"--min-lr-ratio must be between 0 and 1; got {cfg.min_lr_ratio}")
    if not 0 <= cfg.beta2 < 1:
        raise UserError(f"--beta2 must be in [0, 1); got {cfg.beta2}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1); got {cfg.dropout}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"--d-model ({cfg.d_model}) must be a multiple of --n-head ({cfg.n_head})")
    if cfg.tokenizer not in ("bpe", "char"):
        raise UserError(f"--tokenizer must be bpe or char; got {cfg.tokenizer!r}")
    if cfg.tokenizer == "bpe" and cfg.vocab_size < 257 and cfg.data_dir is None:
        raise UserError(f"--vocab-size must be at least 257 for the BPE tokenizer; got {cfg.vocab_size}")
    if cfg.save_dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--save-dtype must be float32, bfloat16 or float16; got {cfg.save_dtype!r}")
    if cfg.data is not None and cfg.data_dir is not None:
        raise UserError("give either --data (a folder of text files) or --data-dir (prepared shards), not both")
    if cfg.data is not None and not os.path.isdir(cfg.data):
        raise UserError(f"--data {cfg.data} is not a folder")
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise UserError(f"--data-dir {cfg.data_dir} is not a folder")
    if not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        raise UserError(f"--temperature must be a positive number; got {cfg.temperature}")
    if not 0 <= cfg.alpha <= 1:
        raise UserError(f"--alpha must be between 0 and 1; got {cfg.alpha}")


def resume_config(saved: dict, given: TrainConfig, defaults: Optional[TrainConfig] = None) -> TrainConfig:
    """The configuration of a resumed run: the saved one, with the ``RESUMABLE_CHANGES`` the caller set
    away from their defaults; any other field set differently from the saved run is a UserError."""
    defaults = defaults or TrainConfig()
    merged = dict(saved)
    for f in dataclasses.fields(TrainConfig):
        k = f.name
        if k in ("resume", "out") or k not in saved:
            continue
        v = getattr(given, k)
        if v == getattr(defaults, k) or v == saved[k]:
            continue
        if k in RESUMABLE_CHANGES:
            merged[k] = v
        else:
            raise UserError(f"--resume: --{k.replace('_', '-')} {v} differs from the run being resumed "
                            f"({saved[k]}); leave it out, or start a new run in another --out folder")
    merged.update(out=given.out, resume=True, progress=given.progress)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in merged.items() if k in known})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model, cfg: TrainConfig, fused: Optional[bool] = None):
    """AdamW; weight decay on matrices only (not on norms, biases). ``fused`` (default: where every
    parameter is a floating tensor on the CPU or CUDA) takes torch's fused AdamW, one kernel over
    all the parameters (baby GPT on 2 CPU threads: 0.8 ms a step against 3.8 ms for the default,
    which on the CPU loops over the parameters one op at a time)."""
    params = list(model.parameters())
    if fused is None:
        fused = fused_adamw_ok(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                             betas=(0.9, getattr(cfg, "beta2", 0.95)), fused=fused)


def _windows(ids, starts, length):
    """(len(starts), length) int64 windows of a tensor of ids or of a shards.TokenStream."""
    if isinstance(ids, torch.Tensor):
        return ids[starts[:, None] + torch.arange(length)]
    return ids.windows(starts.tolist(), length)


def _check_length(ids, context):
    if ids.numel() < context + 2:
        raise UserError(f"train: the corpus has {ids.numel()} tokens, fewer than context + 2 = {context + 2}; "
                        f"give more text or a smaller --context")


def batch_windows(ids, batch: int, context: int, generator: torch.Generator):
    """Random windows: inputs (B, T) and next-token targets (B, T)."""
    _check_length(ids, context)
    starts = torch.randint(0, ids.numel() - context - 1, (batch,), generator=generator)
    w = _windows(ids, starts, context + 1)
    return w[:, :-1], w[:, 1:]


def lm_loss(model, x, y):
    """Mean next-token cross-entropy: the model's fused head + loss where it has one (GPT.loss)."""
    if hasattr(model, "loss"):
        return model.loss(x, y)
    logits = model(x)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


class _LossModule(torch.nn.Module):
    """The loss as a module's forward, so that DistributedDataParallel sees the call and averages the
    gradients (GPT.loss called directly would bypass its hooks)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return lm_loss(self.model, x, y)


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
def evaluate(model, ids, context, n_batches, batch_size=16, ctx: Optional[D.Context] = None, autocast=None):
    """Mean cross-entropy over fixed, evenly spaced windows of the held-out ids (a tensor or a token
    stream); with a distributed ``ctx`` each process takes every world-th window and the sums are
    added up."""
    was_training = model.training
    model.eval()
    n_win = max(1, min(n_batches * batch_size, (ids.numel() - 1) // context))
    starts = torch.linspace(0, ids.numel() - context - 1, n_win).long()
    if ctx is not None and ctx.distributed:
        starts = starts[ctx.rank::ctx.world]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, starts.numel(), batch_size):
        w = _windows(ids, starts[i:i + batch_size], context + 1).to(device)
        with autocast if autocast is not None else contextlib.nullcontext():
            logits = model(w[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    if was_training:
        model.train()
    if ctx is not None and ctx.distributed:
        total, count = D.all_sum(ctx, [total, count])
    return total / count


def plot_losses(history, path, unigram_loss=None, title="fusedformer GPT training"):
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
    ax.set_title(title)
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


def prepare_data(cfg: TrainConfig, log=print, tokenizer=None):
    """Tokenizer, training ids, held-out ids and the held-out files' names (relative to the corpus root).
    ``tokenizer``: use this one (a resumed run's) instead of training one."""
    from .tokenizer import train_tokenizer

    try:
        files = corpus.folder_files(cfg.data) if cfg.data else corpus.default_corpus_files()
        root = cfg.data or corpus.stdlib_root()
        train_files, val_files = corpus.split_files(files, None if cfg.data else stdlib_heldout_files(), root)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e).replace("corpus: ", "train: --data: ")) from None
    train_texts = corpus.read_texts(train_files, cfg.max_chars)
    val_texts = corpus.read_texts(val_files, cfg.max_chars and max(1, cfg.max_chars // corpus.HELDOUT_EVERY))
    if not train_texts or not val_texts:
        raise UserError(f"train: --data {cfg.data}: the training or the held-out files are empty")
    log(f"corpus: {len(train_files)} training and {len(val_files)} held-out files, "
        f"{sum(map(len, train_texts)) / 1e6:.1f} M training characters ({cfg.data or 'the Python standard library'})")
    kind = getattr(cfg, "tokenizer", "bpe")
    tok = tokenizer or train_tokenizer(kind, train_texts + (val_texts if kind == "char" else []), cfg.vocab_size)
    train_ids = corpus.encode_stream(tok, train_texts)
    val_ids = corpus.encode_stream(tok, val_texts)
    log(f"tokenizer: {'byte-level BPE' if kind == 'bpe' else 'characters'}, {tok.get_vocab_size()} tokens; "
        f"{train_ids.numel() / 1e6:.2f} M training and {val_ids.numel() / 1e6:.2f} M held-out tokens")
    return tok, train_ids, val_ids, corpus.relative_names(val_files, root)


def heldout_report(model, tok, train_ids, val_ids, files, context, n_batches, data=None):
    """The held-out evaluation a checkpoint ships with (``metrics.json["heldout"]``): perplexity on
    fixed windows of the held-out ids, the unigram baseline of the training ids, and what they were
    computed on, so that a test can recompute the perplexity and a later run use the same split."""
    loss = evaluate(model, val_ids, context, n_batches)
    return {"perplexity": math.exp(loss), "loss": loss,
            "unigram_perplexity": unigram_perplexity(train_ids, val_ids, tok.get_vocab_size()),
            "context": context, "eval_batches": n_batches, "tokens": int(val_ids.numel()),
            "corpus": data or f"python {platform.python_version()} standard library", "files": files}


def _counts(ids, vocab_size, chunk=1 << 24):
    if isinstance(ids, torch.Tensor):
        return np.bincount(ids.numpy(), minlength=vocab_size).astype(np.float64)
    out = np.zeros(vocab_size, dtype=np.float64)
    for s in range(0, ids.numel(), chunk):
        out += np.bincount(ids.read(s, min(chunk, ids.numel() - s)), minlength=vocab_size)
    return out


def unigram_perplexity(train_ids, val_ids, vocab_size):
    """corpus.unigram_perplexity for tensors or token streams (counted in chunks, never all in memory)."""
    if isinstance(train_ids, torch.Tensor) and isinstance(val_ids, torch.Tensor):
        return corpus.unigram_perplexity(train_ids, val_ids, vocab_size)
    counts = _counts(train_ids, vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    v = _counts(val_ids, vocab_size)
    return float(np.exp(-(v * logp).sum() / v.sum()))


class _StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM set a flag the loop reads between steps (it then saves and stops); a
    second Ctrl-C interrupts at once. Handlers are installed in the main thread only."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _load_data(cfg, ctx, log, tokenizer=None):
    """(tokenizer, train ids, val ids, held-out names): shards by memory map, or text tokenized here (on
    rank 0, then shared)."""
    from . import shards

    if cfg.data_dir:
        index = shards.read_index(cfg.data_dir)
        tok = shards.load_tokenizer_of(cfg.data_dir)
        train_ids, val_ids = shards.TokenStream(cfg.data_dir, "train"), shards.TokenStream(cfg.data_dir, "val")
        if val_ids.numel() == 0:
            raise UserError(f"--data-dir {cfg.data_dir} has no validation tokens")
        log(f"data: {cfg.data_dir}: {train_ids.numel():,} training and {val_ids.numel():,} validation tokens "
            f"({index['dtype']} shards, memory-mapped), {index['tokenizer']} tokenizer with {index['vocab_size']} tokens")
        return tok, train_ids, val_ids, index["val"]["documents"]
    if not ctx.distributed:
        return prepare_data(cfg, log, tokenizer)
    from tokenizers import Tokenizer

    got = None
    if ctx.is_main:
        tok, train_ids, val_ids, names = prepare_data(cfg, log, tokenizer)
        got = (tok.to_str(), train_ids, val_ids, names)
    tok_s, train_ids, val_ids, names = D.broadcast_object(ctx, got)
    return Tokenizer.from_str(tok_s), train_ids, val_ids, names


def train(cfg: TrainConfig, log=print, stop_after: Optional[int] = None):
    """Train, evaluate, save; returns a summary dict (also written to ``<out>/metrics.json``).
    ``stop_after``: stop (saving the training state, as Ctrl-C does) once this many steps are done."""
    check_config(cfg)
    ctx = D.setup(cfg.device)
    clean = False
    try:
        with matmul_precision_scope():  # _train sets the run's (known once a resumed run's config is read)
            out = _train(cfg, ctx, log if ctx.is_main else (lambda *a, **k: None), stop_after)
        clean = True
        return out
    finally:
        D.teardown(ctx, clean)


def _train(cfg, ctx, log, stop_after):
    from tokenizers import Tokenizer

    t0 = time.time()
    state = None
    if cfg.resume:
        try:
            state = load_training_state(cfg.out)
        except FileNotFoundError:
            raise UserError(f"--resume: {cfg.out} has no {STATE_NAME} to resume from") from None
        except ValueError as e:
            raise UserError(f"--resume: {e}") from None
        cfg = resume_config(state["config"], cfg)
        check_config(cfg)
        log(f"resuming {cfg.out} at step {state['step']} of {cfg.steps}")
    if cfg.bf16_matmul:
        set_matmul_precision(MATMUL_BF16)
    torch.manual_seed(cfg.seed)
    teacher = given_tok = None
    if cfg.teacher:
        from .distill import load_teacher

        teacher, given_tok = load_teacher(cfg.teacher)
        if cfg.context > teacher.config.n_positions:
            raise UserError(f"--context {cfg.context} exceeds the teacher's context ({teacher.config.n_positions})")
    if state is not None and not cfg.data_dir:
        given_tok = Tokenizer.from_str(state["tokenizer"])
    tok, train_ids, val_ids, val_files = _load_data(cfg, ctx, log, given_tok)
    V = tok.get_vocab_size()
    if teacher is not None and V != teacher.config.vocab_size:
        raise UserError(f"--data-dir's tokenizer has {V} tokens, the teacher's vocabulary {teacher.config.vocab_size}: "
                        "distill on text (--data) or on shards prepared with the teacher's tokenizer")
    context = min(cfg.context, max(8, val_ids.numel() - 2))
    _check_length(train_ids, context)
    model = GPT(GPTConfig(vocab_size=V, n_positions=cfg.context, d_model=cfg.d_model, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, dropout=cfg.dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    n_params = sum(p.numel() for p in model.parameters())
    global_batch = cfg.batch_size * cfg.grad_accum * ctx.world
    log(f"model: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context {cfg.context}, "
        f"{n_params / 1e6:.2f} M parameters; global batch {global_batch} = {cfg.batch_size} x {cfg.grad_accum} "
        f"accumulation x {ctx.world} process{'es' if ctx.world > 1 else ''} on {ctx.device.type}"
        f"{' with bf16 autocast' if cfg.bf16 else ''}{' with bfloat16 matrix products' if cfg.bf16_matmul else ''}")
    g = torch.Generator().manual_seed(cfg.seed)
    history = {"train": [], "val": []}
    start = 0
    model.to(ctx.device)
    opt = make_optimizer(model, cfg)
    if state is not None:
        if state["vocab_size"] != V:
            raise UserError(f"--resume: the data's tokenizer has {V} tokens, the saved run's {state['vocab_size']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["step"]
    unigram = unigram_perplexity(train_ids, val_ids, V)
    if teacher is not None:
        from .distill import DistillLoss

        teacher.to(ctx.device)
        log(f"distilling from {cfg.teacher} ({teacher.config.n_layer} layers, d_model {teacher.config.d_model}): "
            f"temperature {cfg.temperature}, alpha {cfg.alpha} (weight of the teacher's term)")
        stepper = DistillLoss(model, teacher, cfg.temperature, cfg.alpha)
    else:
        stepper = _LossModule(model)
    if ctx.distributed:
        stepper = torch.nn.parallel.DistributedDataParallel(
            stepper, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    save_every = cfg.save_every or cfg.eval_every
    if ctx.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        remove_stale_temporaries(cfg.out)

    def save(step):
        if not ctx.is_main:
            return
        save_training_state(cfg.out, {
            "step": step, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "generator": g.get_state(), "torch_rng": torch.get_rng_state(),
            "history": history, "tokenizer": tok.to_str(), "vocab_size": V})
        save_pretrained_atomic(model, cfg.out, tokenizer=tok, dtype=getattr(torch, cfg.save_dtype))

    model.train()
    bar = None
    if cfg.progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    say = (lambda s: bar.write(s)) if bar is not None else log
    t_train = time.time()
    step = start
    stopped = False
    n_train = train_ids.numel() - context - 1
    with _StopOnSignal() as stop:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            # one global batch for every process alike; each reads only its own micro-batches
            starts = torch.randint(0, n_train, (global_batch,), generator=g)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for m in range(cfg.grad_accum):
                k = (m * ctx.world + ctx.rank) * cfg.batch_size
                w = _windows(train_ids, starts[k:k + cfg.batch_size], context + 1).to(ctx.device)
                sync = m == cfg.grad_accum - 1 or not ctx.distributed
                with (contextlib.nullcontext() if sync else stepper.no_sync()):
                    with autocast:
                        loss = stepper(w[:, :-1], w[:, 1:]) / cfg.grad_accum
                    loss.backward()
                total += loss.item()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            done = step == cfg.steps or (stop_after is not None and step >= stop_after)
            total, flag = D.all_sum(ctx, [total, float(stop.requested)])
            loss = total / ctx.world
            if not math.isfinite(loss):
                raise RuntimeError(f"train: the loss became {loss} at step {step}; lower --lr")
            history["train"].append({"step": step, "loss": loss})
            stopped = flag > 0 or (stop_after is not None and step >= stop_after and step < cfg.steps)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = evaluate(model, val_ids, context, cfg.eval_batches, ctx=ctx, autocast=autocast)
                history["val"].append({"step": step, "loss": val})
                say(f"step {step}: training loss {loss:.3f}, held-out loss {val:.3f}, perplexity {math.exp(val):.1f} "
                    f"(unigram {unigram:.1f}), {time.time() - t_train:.0f} s")
            if step % save_every == 0 or done or stopped:
                save(step)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                bar.update(1)
            if stopped:
                break
    if bar is not None:
        bar.close()
    train_s = time.time() - t_train
    if stopped:
        log(f"{'interrupted' if flag > 0 else 'stopped'} at step {step} of {cfg.steps}: saved {os.path.join(cfg.out, STATE_NAME)}; continue with "
            f"`python -m fusedformer train --out {cfg.out} --resume`")
        return {"interrupted": True, "step": step, "steps": cfg.steps, "history": history}
    val_loss = evaluate(model, val_ids, context, cfg.eval_batches, ctx=ctx, autocast=autocast)
    heldout = {"perplexity": math.exp(val_loss), "loss": val_loss, "unigram_perplexity": unigram,
               "context": context, "eval_batches": cfg.eval_batches, "tokens": int(val_ids.numel()),
               "corpus": cfg.data_dir or cfg.data or f"python {platform.python_version()} standard library",
               "files": val_files}
    summary = {"steps": cfg.steps, "tokens_seen": cfg.steps * global_batch * context,
               "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t0, 1),
               "steps_per_s": (cfg.steps - start) / train_s if train_s > 0 else None, "processes": ctx.world,
               "final_train_loss": history["train"][-1]["loss"], "heldout_loss": heldout["loss"],
               "heldout_perplexity": heldout["perplexity"], "unigram_perplexity": unigram, "parameters": n_params,
               "vocab_size": V, "resumed_at": start if state is not None else None, "config": dataclasses.asdict(cfg)}
    if ctx.is_main:
        atomic_write_text(os.path.join(cfg.out, "metrics.json"),
                          json.dumps({"summary": summary, "heldout": heldout, "history": history}, indent=1))
        plot_losses(history, os.path.join(cfg.out, "loss.png"), math.log(unigram))
    log(f"held-out loss {val_loss:.3f}, perplexity {summary['heldout_perplexity']:.2f} vs unigram baseline "
        f"{unigram:.2f}; {train_s:.0f} s training; saved to {cfg.out}")
    return summary

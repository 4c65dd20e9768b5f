"""python -m fusedformer <command>: demo, info, bench, train, generate (commands register in COMMANDS)."""

import argparse
import os
import subprocess
import sys


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
        print("fusedformer bench: bench/run.py is part of the source tree; run it from a checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, script] + args.rest)


def _add_demo(sub):
    p = sub.add_parser("demo", help="encoder block from the fused ops vs plain PyTorch; text streamed from the "
                                    "shipped model and its decode speed vs plain PyTorch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt", default="import os\n\n\ndef ")
    p.add_argument("--new-tokens", type=int, default=100, help="tokens to stream from the shipped model")
    p.add_argument("--no-generation", action="store_true", help="only the encoder-block part")
    p.set_defaults(func=_demo)


def _add_info(sub):
    sub.add_parser("info", help="build and machine facts").set_defaults(func=_info)


def _add_bench(sub):
    p = sub.add_parser("bench", help="run the microbenchmarks (bench/run.py) from a source checkout")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)


def _add_train(sub):
    from .train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a small GPT (default corpus: the Python standard library's source)")
    p.add_argument("--data", default=None, help="a folder of text files (default: the standard library's .py files)")
    p.add_argument("--out", default=d.out, help=f"checkpoint folder (default {d.out})")
    for name in ("max_chars", "vocab_size", "context", "d_model", "n_layer", "n_head", "steps", "batch_size",
                 "warmup", "eval_every", "eval_batches", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--save-dtype", default=d.save_dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _train(args):
    from .train import TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    train(TrainConfig(progress=not args.no_progress, **fields))
    return 0


def _add_generate(sub):
    p = sub.add_parser("generate", help="stream text from the shipped model (or --model DIR)")
    p.add_argument("--prompt", default="def ", help="the text to continue")
    p.add_argument("--model", default=None, help="a checkpoint folder (default: the model shipped in the package)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (reproducible output)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "int8_dynamic"],
                   help="quantize the linear layers (the LM head stays float) before generating")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="int4 group size along the input features")
    p.set_defaults(func=_generate)


def _generate(args):
    from .textgen import load_model, stream_text

    model, tok = load_model(args.model, dtype=args.dtype)
    if args.quantize:
        from .quantization import quantize

        try:
            quantize(model, args.quantize, group_size=args.group_size if args.quantize == "int4" else None)
        except ValueError as e:
            raise SystemExit(f"generate --quantize: {e}") from None
    print(args.prompt, end="", flush=True)
    stats = stream_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed,
                        write=lambda s: print(s, end="", flush=True))
    print(f"\n[{stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)
    return 0


# name -> function adding the subcommand's parser
COMMANDS = {"demo": _add_demo, "info": _add_info, "bench": _add_bench, "train": _add_train,
            "generate": _add_generate}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fusedformer", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    args = ap.parse_args(argv)
    return args.func(args)

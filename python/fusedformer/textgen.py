"""Text in, text out: the shipped model (python/fusedformer/assets/) or a checkpoint folder with its
tokenizer, and streaming of generated text."""

import os
import time

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SHIPPED_MODEL = os.path.join(ASSETS, "gpt-stdlib")


def load_model(directory=None, dtype="float32"):
    """(GPT, tokenizer) from a checkpoint folder; the shipped model by default."""
    from .models import GPT
    from .tokenizer import load_tokenizer

    directory = directory or SHIPPED_MODEL
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return GPT.from_pretrained(directory, dtype=dt), load_tokenizer(directory)


def stream_text(model, tokenizer, prompt, *, max_new_tokens=200, seed=None, write=print, **sampling):
    """Generate from ``prompt`` and ``write`` the text as it comes; returns tokens and tokens/s."""
    from .generation import stream
    from .tokenizer import TextDecoder

    ids = tokenizer.encode(prompt).ids or [model.config.bos_token_id or 0]
    ids = ids[-(model.config.n_positions - 1):]
    max_new_tokens = min(max_new_tokens, model.config.n_positions - len(ids))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dec = TextDecoder(tokenizer)
    n = 0
    t0 = time.perf_counter()
    for tokens in stream(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, generator=gen, **sampling):
        n += 1
        if int(tokens[0]) == model.config.eos_token_id:
            break
        write(dec.push(int(tokens[0])))
    dt = time.perf_counter() - t0
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt if dt > 0 else float("inf")}

"""The model and tokenizer an engine serves: a GPT instance, a fusedformer checkpoint folder (the
shipped model by default) or a HuggingFace GPT-2 / Llama checkpoint folder with its tokenizer; and one
text interface over the two kinds of tokenizer (``tokenizers.Tokenizer`` and a transformers one)."""

import json
import os
from typing import List, Optional

import torch

from ..models import GPT


class TextTokenizer:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` (special tokens left out) over a
    ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._fast = hasattr(tokenizer, "encode_batch")  # tokenizers.Tokenizer

    def encode(self, text: str) -> List[int]:
        if self._fast:
            return list(self.tokenizer.encode(text).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])


def _dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"LLM: dtype must be 'auto', a floating torch.dtype or its name; got {dtype!r}")
    return dt


def load(model, tokenizer=None, dtype="auto"):
    """(GPT in eval mode, TextTokenizer or None, name) for ``model``: a GPT, or a checkpoint folder."""
    from ..textgen import SHIPPED_MODEL, load_model
    from ..tokenizer import load_tokenizer

    dt = _dtype(dtype)
    name = "gpt"
    tok = None
    if model is None:
        model = SHIPPED_MODEL
    if isinstance(model, GPT):
        gpt = model
    elif isinstance(model, (str, os.PathLike)):
        directory = os.fspath(model)
        name = os.path.basename(os.path.normpath(directory))
        config = os.path.join(directory, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"LLM: model {directory!r} is not a checkpoint folder (no config.json)")
        with open(config) as f:
            kind = json.load(f).get("model_type")
        if kind == "gpt":
            gpt, tok = load_model(directory, dt or torch.float32)
        elif kind in ("gpt2", "llama"):
            gpt, tok = _load_hf(directory)
        else:
            raise ValueError(f"LLM: model {directory!r} has model_type {kind!r}; expected a fusedformer GPT "
                             "checkpoint, or a HuggingFace gpt2 or llama one")
    else:
        raise TypeError(f"LLM: model must be a GPT or a checkpoint folder; got {type(model).__name__}")
    if dt is not None:
        gpt = gpt.to(dt)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    return gpt.eval(), (TextTokenizer(tok) if tok is not None else None), name


def _load_hf(directory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    gpt = GPT.from_hf(hf)
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):  # weights without a tokenizer: token-id prompts only
        tok = None
    return gpt, tok

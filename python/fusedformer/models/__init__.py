"""Models built on the fused ops: ``GPT`` (decoder-only LM, GPT-2 and Llama shapes), ``Encoder``
(BERT-style, with pooling and a classification head) and ``EncoderDecoder`` (seq2seq with
cross-attention); HuggingFace weight import (``from_hf``) and safetensors checkpoints
(``save_pretrained`` / ``from_pretrained``)."""

from .config import EncoderConfig, EncoderDecoderConfig, GPTConfig
from .encoder import Encoder
from .gpt import GPT
from .blocks import KVCache, set_fused
from .seq2seq import EncoderDecoder

MODELS = {GPTConfig.model_type: GPT, EncoderConfig.model_type: Encoder,
          EncoderDecoderConfig.model_type: EncoderDecoder}


def from_pretrained(directory, **kwargs):
    """Load whichever model a checkpoint folder holds (its config.json names the model_type)."""
    import json
    import os

    from .checkpoint import CONFIG_NAME

    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fusedformer.models.from_pretrained: {path} does not exist")
    with open(path) as f:
        try:
            kind = json.load(f).get("model_type")
        except json.JSONDecodeError as e:
            raise ValueError(f"fusedformer.models.from_pretrained: {path} is not valid JSON ({e})") from None
    if kind not in MODELS:
        raise ValueError(f"fusedformer.models.from_pretrained: unknown model_type {kind!r} in {path}; "
                         f"expected one of {sorted(MODELS)}")
    return MODELS[kind].from_pretrained(directory, **kwargs)


__all__ = ["GPT", "GPTConfig", "Encoder", "EncoderConfig", "EncoderDecoder", "EncoderDecoderConfig", "KVCache", "set_fused",
           "from_pretrained"]

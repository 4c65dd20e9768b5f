"""Model configurations: plain dataclasses that round-trip through JSON (config.json)."""

import dataclasses
from typing import Optional

_NORMS = ("layernorm", "rmsnorm")
_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")
_POSITIONS = ("learned", "rotary")
_POOLINGS = ("mean", "cls", "pooler")


def _fill_d_ff(cfg):
    """The feed-forward width defaults to 4 x d_model (GPT-2's, BERT's and torch.nn.Transformer's)."""
    if cfg.d_ff is None:
        cfg.d_ff = 4 * cfg.d_model


def _check_positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{type(cfg).__name__}.{n} must be a positive integer; got {v!r}")


def _check_multiple(cfg, name, of):
    """``cfg.<name>`` must be a multiple of ``cfg.<of>`` (heads split evenly)."""
    v, d = getattr(cfg, name), getattr(cfg, of)
    if v % d:
        raise ValueError(f"{type(cfg).__name__}.{name} ({v}) must be a multiple of {of} ({d})")


def _check_choices(cfg, **choices):
    for n, allowed in choices.items():
        v = getattr(cfg, n)
        if v not in allowed:
            raise ValueError(f"{type(cfg).__name__}.{n} must be one of {', '.join(allowed)}; got {v!r}")


class _Config:
    model_type = ""

    def to_dict(self):
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        mt = d.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ValueError(f"config is for model_type {mt!r}, not {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config fields {unknown}")
        return cls(**d)


@dataclasses.dataclass
class GPTConfig(_Config):
    """Decoder-only LM. GPT-2: learned positions, LayerNorm, gelu_tanh MLP, biases, tied head.
    Llama: rotary positions, RMSNorm, SwiGLU, no biases, n_kv_head < n_head (GQA), untied head."""

    vocab_size: int = 50257
    n_positions: int = 1024  # longest sequence (learned positions; rotary tables grow on demand)
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None: = n_head
    head_dim: Optional[int] = None  # None: d_model // n_head
    d_ff: Optional[int] = None  # None: 4 * d_model
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"
    positions: str = "learned"
    rope_theta: float = 10000.0
    attn_bias: bool = True  # q/k/v projection bias
    out_bias: bool = True  # attention output projection bias
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    model_type = "gpt"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_head if self.n_head else 0
        _fill_d_ff(self)
        _check_positive(self, "vocab_size", "n_positions", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim",
                        "d_ff")
        _check_multiple(self, "n_head", "n_kv_head")
        _check_choices(self, norm=_NORMS, activation=_ACTIVATIONS, positions=_POSITIONS)


@dataclasses.dataclass
class EncoderConfig(_Config):
    """BERT-style encoder (post-norm blocks, embeddings LayerNorm), pooling and an optional head."""

    vocab_size: int = 30522
    n_positions: int = 512
    type_vocab_size: int = 2
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 12
    d_ff: Optional[int] = None
    norm_eps: float = 1e-12
    activation: str = "gelu"
    dropout: float = 0.0
    pooling: str = "mean"  # "mean" over unmasked tokens, "cls" (first token), "pooler" (dense + tanh on CLS)
    num_labels: int = 0  # > 0 adds a classification head on the pooled vector
    pad_token_id: int = 0
    model_type = "encoder"

    def __post_init__(self):
        _fill_d_ff(self)
        _check_positive(self, "vocab_size", "n_positions", "d_model", "n_layer", "n_head", "d_ff")
        _check_multiple(self, "d_model", "n_head")
        _check_choices(self, activation=_ACTIVATIONS, pooling=_POOLINGS)


@dataclasses.dataclass
class EncoderDecoderConfig(_Config):
    """Sequence-to-sequence Transformer in the torch.nn.Transformer layout: an encoder stack and a decoder
    stack (self-attention, cross-attention, MLP) each closed by a LayerNorm; learned positions, shared or
    separate source/target vocabularies."""

    src_vocab_size: int = 1000
    tgt_vocab_size: int = 1000
    n_positions: int = 512
    d_model: int = 512
    n_head: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: Optional[int] = None
    norm_first: bool = True
    norm_eps: float = 1e-5
    activation: str = "relu"
    dropout: float = 0.0
    tie_embeddings: bool = True  # target embedding and output head share weights
    bos_token_id: int = 1  # the decoder's start token
    eos_token_id: Optional[int] = 2
    pad_token_id: int = 0
    model_type = "encoder-decoder"

    def __post_init__(self):
        _fill_d_ff(self)
        _check_positive(self, "src_vocab_size", "tgt_vocab_size", "n_positions", "d_model", "n_head",
                        "n_encoder_layers", "n_decoder_layers", "d_ff")
        _check_multiple(self, "d_model", "n_head")
        _check_choices(self, activation=_ACTIVATIONS)


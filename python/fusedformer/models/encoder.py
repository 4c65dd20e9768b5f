"""Encoder: a BERT-style bidirectional encoder with pooling and an optional classification head."""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import Block, Norm, init_weights
from .checkpoint import CheckpointMixin
from .config import EncoderConfig


class Encoder(CheckpointMixin, nn.Module):
    """Word + position + token-type embeddings and a LayerNorm, then ``n_layer`` post-norm blocks.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` -> hidden states (B, L, D);
    ``encode(...)`` -> pooled vectors (B, D) (``normalize=True`` for unit length, as sentence embeddings);
    ``classify(...)`` -> logits (B, num_labels) from the head on the pooled vector.
    """

    config_class = EncoderConfig

    def __init__(self, config: Optional[EncoderConfig] = None, **kwargs):
        super().__init__()
        c = self._init_config(config, kwargs)
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.n_positions, c.d_model)
        self.type_embed = nn.Embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None
        self.embed_norm = Norm(c.d_model, "layernorm", c.norm_eps)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.d_ff, norm="layernorm", norm_eps=c.norm_eps, activation=c.activation,
                  norm_first=False, dropout=c.dropout)
            for _ in range(c.n_layer))
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.pooling == "pooler" else None
        self.classifier = nn.Linear(c.d_model, c.num_labels) if c.num_labels > 0 else None
        init_weights(self)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"Encoder: input_ids must be (batch, length); got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > c.n_positions:
            raise ValueError(f"Encoder: length {L} exceeds n_positions {c.n_positions}")
        pos = torch.arange(L, device=input_ids.device)
        h = self.embed(input_ids) + self.pos_embed(pos)
        if self.type_embed is not None:
            if token_type_ids is None:
                h = h + self.type_embed.weight[0]
            else:
                h = h + self.type_embed(token_type_ids)
        h = self.embed_norm(h)
        if c.dropout > 0 and self.training:
            h = F.dropout(h, c.dropout)
        mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        for blk in self.blocks:
            h, _ = blk(h, attn_mask=mask)
        return h

    def pool(self, hidden, attention_mask=None):
        """(B, L, D) -> (B, D) by the configured pooling."""
        kind = self.config.pooling
        if kind == "mean":
            if attention_mask is None:
                return hidden.mean(1)
            m = attention_mask.to(hidden.dtype)[..., None]
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        cls = hidden[:, 0]
        return torch.tanh(self.pooler(cls)) if kind == "pooler" else cls

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, normalize=False):
        """Pooled sequence vectors (B, D); unit length with ``normalize``."""
        v = self.pool(self(input_ids, attention_mask, token_type_ids), attention_mask)
        return F.normalize(v, dim=-1) if normalize else v

    def classify(self, input_ids, attention_mask=None, token_type_ids=None):
        """Class logits (B, num_labels)."""
        if self.classifier is None:
            raise ValueError("Encoder.classify: the config has num_labels=0 (no classification head)")
        return self.classifier(self.encode(input_ids, attention_mask, token_type_ids))

    @classmethod
    def from_hf(cls, model, *, pooling="mean"):
        """An Encoder with the weights of a HuggingFace ``BertModel`` (e.g. all-MiniLM-L6-v2)."""
        from .from_hf import encoder_from_hf

        return encoder_from_hf(cls, model, pooling=pooling)

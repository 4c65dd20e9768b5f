"""EncoderDecoder: a sequence-to-sequence Transformer with cross-attention (torch.nn.Transformer layout)."""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.linear import Linear
from .blocks import Block, KVCache, Norm, close_stack, init_weights
from .checkpoint import CheckpointMixin
from .config import EncoderDecoderConfig


class EncoderDecoder(CheckpointMixin, nn.Module):
    """Source and target embeddings with learned positions; an encoder stack and a decoder stack
    (self-attention, cross-attention, MLP), each closed by a LayerNorm; output head tied to the target
    embedding (or not).

    ``forward(src_ids, tgt_ids, src_mask=None, tgt_mask=None)`` -> logits (B, T, V) (teacher forcing);
    ``encode(src_ids, src_mask)`` -> memory (B, S, D); ``decode(tgt_ids, memory, src_mask, ...)`` -> logits.
    """

    config_class = EncoderDecoderConfig

    def __init__(self, config: Optional[EncoderDecoderConfig] = None, **kwargs):
        super().__init__()
        c = self._init_config(config, kwargs)
        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.n_positions, c.d_model)

        def block(cross):
            return Block(c.d_model, c.n_head, c.d_ff, norm="layernorm", norm_eps=c.norm_eps, activation=c.activation,
                         norm_first=c.norm_first, cross=cross, dropout=c.dropout)

        self.encoder = nn.ModuleList(block(False) for _ in range(c.n_encoder_layers))
        self.encoder_norm = Norm(c.d_model, "layernorm", c.norm_eps)
        self.decoder = nn.ModuleList(block(True) for _ in range(c.n_decoder_layers))
        self.decoder_norm = Norm(c.d_model, "layernorm", c.norm_eps)
        self.head = Linear(c.d_model, c.tgt_vocab_size, bias=False)
        init_weights(self, n_layer=max(c.n_encoder_layers, c.n_decoder_layers))
        if c.tie_embeddings:
            self.head.weight = self.tgt_embed.weight

    @property
    def is_encoder_decoder(self):
        return True

    def _embed(self, table, ids, start=0, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(start, start + ids.shape[1], device=ids.device)
        if int(start + ids.shape[1]) > self.config.n_positions:
            raise ValueError(f"EncoderDecoder: length {start + ids.shape[1]} exceeds n_positions "
                             f"{self.config.n_positions}")
        h = table(ids) + self.pos_embed(position_ids)
        return F.dropout(h, self.config.dropout) if self.config.dropout > 0 and self.training else h

    def encode(self, src_ids, src_mask=None):
        """Source ids (B, S) -> memory (B, S, D); ``src_mask`` (B, S): 1 for tokens, 0 for padding."""
        h, delta = self._embed(self.src_embed, src_ids), None
        mask = src_mask.bool()[:, None, None, :] if src_mask is not None else None
        for blk in self.encoder:
            h, delta = blk(h, delta, attn_mask=mask)
        return close_stack(self.encoder_norm, h, delta)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        c = self.config
        p = self.tgt_embed.weight
        hd = c.d_model // c.n_head
        return KVCache(c.n_decoder_layers, batch, c.n_head, max_len, hd, dtype or p.dtype, device or p.device,
                       cross=True)

    def decode(self, tgt_ids, memory, src_mask=None, tgt_mask=None, cache: Optional[KVCache] = None,
               last_only=False):
        """Target ids (B, T) attending causally to themselves (and to the cached ones) and to ``memory``."""
        B, T = tgt_ids.shape
        start = cache.length if cache is not None else 0
        h, delta = self._embed(self.tgt_embed, tgt_ids, start), None
        mem_mask = src_mask.bool()[:, None, None, :] if src_mask is not None else None
        mask = tgt_mask.bool()[:, None, None, :] if tgt_mask is not None else None
        if cache is not None:
            cache.mask[:, start:start + T] = True if tgt_mask is None else tgt_mask.bool()
            mask = cache.key_mask(start + T) if (tgt_mask is not None or start > 0) else None
        for i, blk in enumerate(self.decoder):
            h, delta = blk(h, delta, attn_mask=mask, is_causal=T > 1, cache=cache, layer=i, memory=memory,
                           memory_mask=mem_mask)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h, delta = h[:, -1], (delta[:, -1] if delta is not None else None)
        return self.head(close_stack(self.decoder_norm, h, delta))

    def forward(self, src_ids, tgt_ids, src_mask=None, tgt_mask=None):
        memory = self.encode(src_ids, src_mask)
        return self.decode(tgt_ids, memory, src_mask, tgt_mask)

    def generate(self, src_ids, src_mask=None, **kwargs):
        """``fusedformer.generate(self, src_ids, src_mask, ...)``: target sequences starting with the
        decoder start token (``config.bos_token_id``)."""
        # The one reference from models up to generation, for the method users expect on a model:
        # generation uses models only through their interface and imports none of them (no cycle).
        from ..generation import generate

        return generate(self, src_ids, src_mask, **kwargs)

"""GPT: a decoder-only language model covering the GPT-2 and Llama shapes."""

from typing import Optional

import torch
import torch.nn as nn

from .. import ops
from ..nn.linear import Linear
from ..ops.linear import uses_kernel as linear_uses_kernel
from .blocks import Block, KVCache, Norm, Rotary, close_stack, init_weights
from .checkpoint import CheckpointMixin
from .config import GPTConfig
from .paged import PagedKVCache


def _global_hooks() -> bool:
    """Whether forward hooks for every module are registered (torch.nn.modules.module)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


class GPT(CheckpointMixin, nn.Module):
    """Token embedding (+ learned positions, or rotary in attention), ``n_layer`` pre-norm blocks, final
    norm, LM head (tied to the embedding or not).

    ``forward(input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False)`` returns
    logits (B, L, V), or (B, V) for the last position only with ``last_only`` (what generation needs).
    """

    config_class = GPTConfig

    def __init__(self, config: Optional[GPTConfig] = None, **kwargs):
        super().__init__()
        c = self._init_config(config, kwargs)
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.n_positions, c.d_model) if c.positions == "learned" else None
        self.rotary = Rotary(c.head_dim, c.rope_theta) if c.positions == "rotary" else None
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.d_ff, n_kv_head=c.n_kv_head, head_dim=c.head_dim, norm=c.norm,
                  norm_eps=c.norm_eps, activation=c.activation, attn_bias=c.attn_bias, out_bias=c.out_bias,
                  mlp_bias=c.mlp_bias, norm_first=True, dropout=c.dropout)
            for _ in range(c.n_layer))
        self.norm = Norm(c.d_model, c.norm, c.norm_eps)
        self.head = Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, n_layer=c.n_layer)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def is_encoder_decoder(self):
        return False

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        c = self.config
        p = self.embed.weight
        return KVCache(c.n_layer, batch, c.n_kv_head, max_len, c.head_dim, dtype or p.dtype, device or p.device)

    def new_paged_cache(self, num_blocks: int, block_size: int, dtype=None, device=None) -> PagedKVCache:
        c = self.config
        p = self.embed.weight
        return PagedKVCache.allocate(c.n_layer, num_blocks, c.n_kv_head, block_size, c.head_dim, dtype or p.dtype,
                                     device or p.device)

    def forward_packed(self, input_ids, position_ids, cache: PagedKVCache, logits_indices=None):
        """One step of a packed batch: ``input_ids`` and ``position_ids`` (T,), the new tokens of several
        sequences one after another, their keys/values written to and attention read from the paged
        ``cache`` (its ``metadata`` set for this step). Returns the logits (len(logits_indices), V) of
        the rows ``logits_indices`` (all T rows when None)."""
        c = self.config
        if self.pos_embed is not None and input_ids.numel() and int(position_ids.max()) >= c.n_positions:
            raise ValueError(f"GPT: positions up to {int(position_ids.max()) + 1} exceed n_positions {c.n_positions}")
        h = self.embed(input_ids)  # (T, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed(position_ids)
        rope = None
        if self.rotary is not None:
            cos, sin = self.rotary(position_ids[None], h.dtype)  # (1, 1, T, E)
            rope = cos[0, 0, :, None], sin[0, 0, :, None]  # (T, 1, E): broadcast over the heads
        delta = None
        for i, blk in enumerate(self.blocks):
            h, delta = blk(h, delta, rope=rope, cache=cache, layer=i)
        if logits_indices is not None:
            h, delta = h[logits_indices], delta[logits_indices]
        return self.head(close_stack(self.norm, h, delta))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                last_only: bool = False):
        return self.head(self.hidden(input_ids, attention_mask, position_ids, cache, last_only))

    def loss(self, input_ids, targets, attention_mask=None, position_ids=None, ignore_index: int = -100):
        """Mean cross-entropy of the next-token logits against ``targets`` (B, L) (positions equal to
        ``ignore_index`` left out): ``F.cross_entropy(self(input_ids).flatten(0, 1), targets.flatten())``
        with the LM head fused into the loss (``fusedformer.ops.linear_cross_entropy``), so the (B, L,
        vocab) logits and their gradient are never materialized."""
        h = self.hidden(input_ids, attention_mask, position_ids)
        return ops.linear_cross_entropy(h, self.head.weight, targets, self.head.bias, ignore_index=ignore_index)

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
               last_only: bool = False):
        """The final-norm hidden states (B, L, d_model) (or (B, d_model) with ``last_only``) that the
        LM head turns into logits; the arguments as in ``forward``."""
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"GPT: input_ids must be (batch, length); got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=input_ids.device).expand(B, L)
        if self.pos_embed is not None and start + L > c.n_positions:
            raise ValueError(f"GPT: positions up to {start + L} exceed n_positions {c.n_positions}")
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            h = h + self.pos_embed(position_ids)
        if c.dropout > 0 and self.training:
            h = nn.functional.dropout(h, c.dropout)
        rope = self.rotary(position_ids, h.dtype) if self.rotary is not None else None
        mask = None
        if cache is not None:
            if attention_mask is not None:
                cache.mask[:, start:start + L] = attention_mask[:, -L:].bool()
            else:
                cache.mask[:, start:start + L] = True
            if attention_mask is not None or start > 0:
                mask = cache.key_mask(start + L)
        elif attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]
        is_causal = L > 1
        delta = None
        plans = self._decode_plans(h, cache)
        if plans is not None:
            cache.reserve(L)  # its error when the cache is full
            for i, (params, schemes, kw) in enumerate(plans):
                h, delta = ops.decode_layer(h, delta, params, schemes, cache.k[i], cache.v[i], start, mask, rope, **kw)
        else:
            for i, blk in enumerate(self.blocks):
                h, delta = blk(h, delta, rope=rope, attn_mask=mask, is_causal=is_causal, cache=cache, layer=i)
        if cache is not None:
            cache.length = start + L
        if last_only:
            h, delta = h[:, -1], delta[:, -1]
        return close_stack(self.norm, h, delta)

    def _decode_plans(self, h, cache):
        """Each block's ``ops.decode_layer`` arguments (Block.decode_plan) when ``h`` (B, 1, D) is one
        new token per sequence to decode on the CPU with a dense cache, outside autograd, autocast and
        compilation, and every block can take the op; else None (the blocks run as modules). Made at
        the cache's first one-token step and kept in it for the steps after: a generation's model does
        not change between its steps."""
        if not (isinstance(cache, KVCache) and h.shape[1] == 1 and h.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and not _global_hooks()):
            return None
        key = (id(self), h.dtype, h.shape[0])
        if cache.decode_plans is not None and cache.decode_plans[0] == key:
            return cache.decode_plans[1]
        plans = [blk.decode_plan(h.dtype) for blk in self.blocks]
        if any(p is None for p in plans):
            plans = None
        elif not linear_uses_kernel(h):
            # float projections of these rows go to torch's product, as fusedformer.ops.linear sends them
            plans = [(params, ["torch" if s == "" else s for s in schemes], kw) for params, schemes, kw in plans]
        cache.decode_plans = (key, plans)
        return plans

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """``fusedformer.generate(self, ...)``."""
        # The one reference from models up to generation, for the method users expect on a model:
        # generation uses models only through their interface and imports none of them (no cycle).
        from ..generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    @classmethod
    def from_hf(cls, model):
        """A GPT with the weights of a HuggingFace ``GPT2LMHeadModel`` or ``LlamaForCausalLM``."""
        from .from_hf import gpt_from_hf

        return gpt_from_hf(cls, model)

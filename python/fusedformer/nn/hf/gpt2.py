"""Fused twins of transformers' GPT-2 modules.

- ``GPT2Attention`` (self-attention): the packed ``c_attn`` projection split into strided head
  views, fusedformer attention (causal by the kernel when the model passes no mask), the KV cache
  updated as transformers does. Cross-attention, requested attention weights and the eager
  ``reorder_and_upcast_attn`` variant run transformers' own forward.
- ``GPT2Block``: the residual add after attention is fused into ``ln_2``.
"""

from typing import Optional

from torch import Tensor
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.gpt2 import modeling_gpt2 as mg

from ..functional import merge_heads, split_heads
from ..residual import pre_norm_add
from .common import attend, native_masks, take_cache


class FusedGPT2Attention(mg.GPT2Attention):
    def forward(
        self,
        hidden_states: Tensor,
        cache=None,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        output_attentions: Optional[bool] = False,
        **kwargs,
    ):
        cache = take_cache(cache, kwargs)
        if (
            encoder_hidden_states is not None
            or output_attentions
            or native_masks(self)
            or (self.reorder_and_upcast_attn and self.config._attn_implementation == "eager")
        ):
            return super().forward(
                hidden_states, cache, attention_mask, encoder_hidden_states, encoder_attention_mask,
                output_attentions, **kwargs,
            )
        q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        q, k, v = (split_heads(t, self.num_heads, True) for t in (q, k, v))
        if cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            k, v = cache.update(k, v, self.layer_idx)
        out = attend(self, q, k, v, attention_mask, self.attn_dropout.p if self.training else 0.0, self.scaling,
                     kwargs.get("is_causal"))
        out = self.resid_dropout(self.c_proj(merge_heads(out, True)))
        return out, None


class FusedGPT2Block(mg.GPT2Block):
    def forward(
        self,
        hidden_states: Tensor,
        cache=None,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        use_cache: Optional[bool] = False,
        **kwargs,
    ) -> Tensor:
        cache = take_cache(cache, kwargs)
        if encoder_hidden_states is not None:
            return super().forward(
                hidden_states, cache, attention_mask, encoder_hidden_states, encoder_attention_mask,
                use_cache, **kwargs,
            )
        # the cache goes by position, where every transformers 5 release takes it
        attn_output, _ = self.attn(
            self.ln_1(hidden_states), cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs,
        )
        normed, hidden_states = pre_norm_add(self.ln_2, attn_output, hidden_states)
        return hidden_states + self.mlp(normed)


TWINS = {mg.GPT2Attention: FusedGPT2Attention, mg.GPT2Block: FusedGPT2Block}

REQUIRES = {
    mg.GPT2Attention: (
        ("c_attn", "c_proj", "attn_dropout", "resid_dropout", "split_size", "num_heads", "scaling", "layer_idx",
         "reorder_and_upcast_attn", "is_cross_attention"),
        ("self", "hidden_states", "cache", "attention_mask", "encoder_hidden_states",
         "encoder_attention_mask", "output_attentions", "kwargs"),
    ),
    mg.GPT2Block: (
        ("ln_1", "attn", "ln_2", "mlp"),
        ("self", "hidden_states", "cache", "attention_mask", "encoder_hidden_states",
         "encoder_attention_mask", "use_cache", "kwargs"),
    ),
}

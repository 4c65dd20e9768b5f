"""Fused twins of transformers' Llama modules.

- ``LlamaRMSNorm``: the fused RMSNorm kernel (computed in float32, one rounding to the input dtype).
- ``LlamaAttention``: one packed q/k/v projection, rotary embedding as transformers applies it,
  fusedformer attention reading the grouped key/value heads in place (no ``repeat_kv``).
- ``LlamaDecoderLayer``: the residual add after attention is fused into ``post_attention_layernorm``.
"""

from typing import Optional

from torch import Tensor
from transformers.models.llama import modeling_llama as ml

from ...ops import rms_norm
from ..functional import merge_heads, split_heads
from ..linear import call_linear
from ..residual import pre_norm_add
from .common import attend, cache_arg, native_masks, packed_projection, take_cache


class FusedLlamaRMSNorm(ml.LlamaRMSNorm):
    _fusedformer_residual = True

    def forward(self, hidden_states: Tensor, residual: Optional[Tensor] = None):
        return rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon, residual=residual)


class FusedLlamaAttention(ml.LlamaAttention):
    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings=None,
        attention_mask: Optional[Tensor] = None,
        cache=None,
        **kwargs,
    ):
        cache = take_cache(cache, kwargs)
        if kwargs.get("output_attentions") or native_masks(self):
            return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        q, k, v = packed_projection(self, (self.q_proj, self.k_proj, self.v_proj), hidden_states).split(sizes, dim=-1)
        q, k, v = (split_heads(t, t.size(-1) // self.head_dim, True) for t in (q, k, v))
        cos, sin = position_embeddings
        q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = attend(self, q, k, v, attention_mask, self.attention_dropout if self.training else 0.0, self.scaling,
                     kwargs.get("is_causal"))
        return call_linear(self.o_proj, merge_heads(out, True)), None


class FusedLlamaDecoderLayer(ml.LlamaDecoderLayer):
    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids=None,
        cache=None,
        use_cache: Optional[bool] = False,
        position_embeddings=None,
        **kwargs,
    ) -> Tensor:
        kwargs[_ATTN_CACHE] = take_cache(cache, kwargs)
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )
        normed, hidden_states = pre_norm_add(self.post_attention_layernorm, attn_output, hidden_states)
        return hidden_states + self.mlp(normed)


# the keyword under which the decoder layer passes the cache to its attention (HF's or the twin)
_ATTN_CACHE = cache_arg(ml.LlamaAttention)

TWINS = {
    ml.LlamaRMSNorm: FusedLlamaRMSNorm,
    ml.LlamaAttention: FusedLlamaAttention,
    ml.LlamaDecoderLayer: FusedLlamaDecoderLayer,
}

REQUIRES = {
    ml.LlamaRMSNorm: (("weight", "variance_epsilon"), ("self", "hidden_states")),
    ml.LlamaAttention: (
        ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "attention_dropout", "layer_idx"),
        ("self", "hidden_states", "position_embeddings", "attention_mask", "cache", "kwargs"),
    ),
    ml.LlamaDecoderLayer: (
        ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
        ("self", "hidden_states", "attention_mask", "position_ids", "cache", "use_cache",
         "position_embeddings", "kwargs"),
    ),
}

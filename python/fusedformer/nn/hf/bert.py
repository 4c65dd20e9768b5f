"""Fused twins of transformers' BERT modules (also the models built on them, e.g. all-MiniLM-L6-v2).

- ``BertSelfAttention``: one packed q/k/v projection, heads as strided views, fusedformer attention
  with the model's mask (sdpa or eager format) and scaling. With a KV cache or when attention
  weights are requested, transformers' own forward runs.
- ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dense(x) + input)`` with the residual add fused
  into the norm.
"""

from typing import Optional

import torch
from torch import Tensor
from transformers.models.bert import modeling_bert as mb

from ..functional import merge_heads, split_heads
from ..layers import add_norm
from .common import attend, native_masks, packed_linear


class FusedBertSelfAttention(mb.BertSelfAttention):
    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        past_key_values=None,
        **kwargs,
    ):
        if past_key_values is not None or kwargs.get("output_attentions") or native_masks(self):
            return super().forward(hidden_states, attention_mask, past_key_values, **kwargs)
        w, b = packed_linear(self, (self.query, self.key, self.value))
        q, k, v = torch.nn.functional.linear(hidden_states, w, b).split(self.all_head_size, dim=-1)
        h = self.num_attention_heads
        q, k, v = (split_heads(t, h, True) for t in (q, k, v))
        out = attend(self, q, k, v, attention_mask, self.dropout.p if self.training else 0.0, self.scaling,
                     kwargs.get("is_causal"))
        return merge_heads(out, True), None


class FusedBertSelfOutput(mb.BertSelfOutput):
    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return add_norm(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)[0]


class FusedBertOutput(mb.BertOutput):
    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return add_norm(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)[0]


TWINS = {
    mb.BertSelfAttention: FusedBertSelfAttention,
    mb.BertSelfOutput: FusedBertSelfOutput,
    mb.BertOutput: FusedBertOutput,
}

# what each twin's forward relies on: attributes of the instance, and the original forward's parameters
REQUIRES = {
    mb.BertSelfAttention: (
        ("query", "key", "value", "dropout", "num_attention_heads", "all_head_size", "scaling"),
        ("self", "hidden_states", "attention_mask", "past_key_values", "kwargs"),
    ),
    mb.BertSelfOutput: (("dense", "dropout", "LayerNorm"), ("self", "hidden_states", "input_tensor")),
    mb.BertOutput: (("dense", "dropout", "LayerNorm"), ("self", "hidden_states", "input_tensor")),
}

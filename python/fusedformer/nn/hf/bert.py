"""Fused twins of transformers' BERT modules (also the models built on them, e.g. all-MiniLM-L6-v2).

- ``BertSelfAttention``: one packed q/k/v projection, heads as strided views, fusedformer attention
  with the model's mask (sdpa or eager format) and scaling. With a KV cache or when attention
  weights are requested, transformers' own forward runs.
- ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dense(x) + input)`` with the residual add fused
  into the norm.
- ``BertEncoder``: in inference (no autograd), when the model's mask only marks padded keys, the
  padded tokens are dropped before the layers and every token-wise part (projections, norms,
  feed-forward) runs on the real tokens only; on the CPU so does the attention (each sentence's
  tokens packed one after another, ``fusedformer.ops.attention_varlen``: no mask read, no work on
  padding), elsewhere it runs on the padded layout with the key-padding mask. The
  outputs at real tokens are the same; at padded positions ``last_hidden_state`` holds zeros (as
  torch.nn.TransformerEncoder's nested-tensor fast path does) instead of values computed from
  padding. ``fusedformer.patch(model, skip_padding=False)`` keeps the padded computation.
"""

from typing import Optional

import torch
from torch import Tensor
from transformers.activations import GELUActivation
from transformers.models.bert import modeling_bert as mb

from ...ops import attention_varlen
from ..functional import merge_heads, split_heads
from ..linear import call_linear
from ..residual import post_norm_add
from .common import attend, capturing_outputs, native_masks, packed_projection, take_cache


class FusedBertSelfAttention(mb.BertSelfAttention):
    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        cache=None,
        **kwargs,
    ):
        cache = take_cache(cache, kwargs)
        if cache is not None or kwargs.get("output_attentions") or native_masks(self):
            return super().forward(hidden_states, attention_mask, cache, **kwargs)
        q, k, v = packed_projection(self, (self.query, self.key, self.value), hidden_states).split(
            self.all_head_size, dim=-1)
        h = self.num_attention_heads
        q, k, v = (split_heads(t, h, True) for t in (q, k, v))
        out = attend(self, q, k, v, attention_mask, self.dropout.p if self.training else 0.0, self.scaling,
                     kwargs.get("is_causal"))
        return merge_heads(out, True), None


class FusedBertSelfOutput(mb.BertSelfOutput):
    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return post_norm_add(self.LayerNorm, self.dropout(call_linear(self.dense, hidden_states)), input_tensor)


class FusedBertOutput(mb.BertOutput):
    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return post_norm_add(self.LayerNorm, self.dropout(call_linear(self.dense, hidden_states)), input_tensor)


def _key_padding(mask: Optional[Tensor]) -> Optional[Tensor]:
    """The ``(B, S)`` keep mask if ``mask`` is an sdpa-format (bool, True = keep) self-attention mask
    that only marks padded keys (every query row the same), else None."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.size(1) != 1 or mask.size(2) != mask.size(3):
        return None
    keep = mask[:, 0, :1, :]
    if not bool((mask[:, 0] == keep).all()):
        return None
    return keep[:, 0]


def _scatter_rows(x: Tensor, rows: Tensor, pad_rows: Tensor, total: int) -> Tensor:
    """A ``(total, F)`` tensor with the rows of ``x`` at ``rows`` and zeros at ``pad_rows`` (the
    other rows): only the padded rows are zero-filled, not the whole buffer."""
    full = x.new_empty(total, x.size(-1))
    full.index_copy_(0, rows, x)
    return full.index_fill_(0, pad_rows, 0.0)


class _Tokens:
    """Where the real tokens of a (B, L) keep mask are: index vectors in general, and per-row lengths
    when every row is a prefix of tokens followed by padding (right padding, BERT's tokenizers), where
    scattering and gathering are B slice copies instead of indexed copies (several times faster)."""

    def __init__(self, keep: Tensor, packed_attention: bool):
        self.B, self.L = keep.shape
        lengths = keep.sum(1)
        prefix = bool((keep == (torch.arange(self.L, device=keep.device) < lengths[:, None])).all())
        self.lengths = lengths.tolist() if prefix else None
        flat = keep.flatten()
        self.rows = flat.nonzero().squeeze(1)
        self.pad_rows = None if prefix else flat.logical_not().nonzero().squeeze(1)
        # the real tokens are gathered sequence after sequence: sequence b is rows cu[b]:cu[b + 1]
        self.cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]) if packed_attention else None

    def gather(self, x: Tensor) -> Tensor:
        """(B, L, ...) -> (T, ...): the real tokens in order."""
        if self.lengths is not None:
            return torch.cat([x[b, :n] for b, n in enumerate(self.lengths)])
        return x.flatten(0, 1).index_select(0, self.rows)

    def scatter(self, x: Tensor) -> Tensor:
        """(T, F) -> (B, L, F) with zeros at the padded positions."""
        if self.lengths is not None:
            full = x.new_empty(self.B, self.L, x.size(-1))
            start = 0
            for b, n in enumerate(self.lengths):
                full[b, :n] = x[start:start + n]
                full[b, n:] = 0.0
                start += n
            return full
        return _scatter_rows(x, self.rows, self.pad_rows, self.B * self.L).view(self.B, self.L, -1)


def _intermediate(inter: torch.nn.Module, h: Tensor) -> Tensor:
    """``BertIntermediate`` without autograd: the exact GELU overwrites the fresh projection (no
    second intermediate-sized buffer)."""
    act = inter.intermediate_act_fn
    if type(inter) is mb.BertIntermediate and type(act) is GELUActivation and act.act is torch.nn.functional.gelu:
        return torch.ops.aten.gelu_(call_linear(inter.dense, h))
    return inter(h)


def _unpadded_layer(layer: mb.BertLayer, x: Tensor, keep4: Tensor, tokens: _Tokens) -> Tensor:
    """One BertLayer over the real tokens ``x`` (T, D); attention on the packed tokens (CPU) or the padded layout."""
    sa = layer.attention.self
    qkv = packed_projection(sa, (sa.query, sa.key, sa.value), x)
    if tokens.cu is not None:
        q, k, v = (t.unflatten(-1, (sa.num_attention_heads, -1)) for t in qkv.split(sa.all_head_size, dim=-1))
        out = attention_varlen(q, k, v, tokens.cu, scale=sa.scaling).flatten(1)
    else:
        q, k, v = tokens.scatter(qkv).split(sa.all_head_size, dim=-1)
        q, k, v = (split_heads(t, sa.num_attention_heads, True) for t in (q, k, v))
        out = attend(sa, q, k, v, keep4, 0.0, sa.scaling, False)
        out = tokens.gather(out.transpose(1, 2)).flatten(1)
    h = layer.attention.output(out, x)
    return layer.output(_intermediate(layer.intermediate, h), h)


class FusedBertEncoder(mb.BertEncoder):
    skip_padding = True
    # with skipped padding on the CPU: attention over the packed tokens (False: the padded layout and
    # the key-padding mask, as on other devices)
    packed_attention = True

    def _can_skip_padding(self, hidden_states, attention_mask, encoder_hidden_states, cache) -> bool:
        if not self.skip_padding or torch.is_grad_enabled() or encoder_hidden_states is not None:
            return False
        if cache is not None or capturing_outputs() or torch.compiler.is_compiling():
            return False
        for layer in self.layer:
            if (
                type(layer) is not mb.BertLayer
                or layer.is_decoder
                or layer.chunk_size_feed_forward
                or type(layer.attention.self) is not FusedBertSelfAttention
                or type(layer.attention.output) is not FusedBertSelfOutput
                or type(layer.output) is not FusedBertOutput
                or layer.attention.self.training
                or native_masks(layer.attention.self)
                or any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules())
            ):
                return False
        return hidden_states.dim() == 3

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None,
        cache=None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ):
        cache = take_cache(cache, kwargs)
        keep = None
        if self._can_skip_padding(hidden_states, attention_mask, encoder_hidden_states, cache):
            keep = _key_padding(attention_mask)
        if keep is None or bool(keep.all()):
            return super().forward(
                hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache,
                use_cache, **kwargs,
            )
        B, L, D = hidden_states.shape
        tokens = _Tokens(keep, self.packed_attention and hidden_states.device.type == "cpu")
        x = tokens.gather(hidden_states)
        keep4 = keep.view(B, 1, 1, L)
        for layer in self.layer:
            x = _unpadded_layer(layer, x, keep4, tokens)
        return mb.BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=tokens.scatter(x))


TWINS = {
    mb.BertSelfAttention: FusedBertSelfAttention,
    mb.BertSelfOutput: FusedBertSelfOutput,
    mb.BertOutput: FusedBertOutput,
    mb.BertEncoder: FusedBertEncoder,
}

# what each twin's forward relies on: attributes of the instance, and the original forward's parameters
REQUIRES = {
    mb.BertSelfAttention: (
        ("query", "key", "value", "dropout", "num_attention_heads", "all_head_size", "scaling"),
        ("self", "hidden_states", "attention_mask", "cache", "kwargs"),
    ),
    mb.BertSelfOutput: (("dense", "dropout", "LayerNorm"), ("self", "hidden_states", "input_tensor")),
    mb.BertOutput: (("dense", "dropout", "LayerNorm"), ("self", "hidden_states", "input_tensor")),
    mb.BertEncoder: (
        ("layer",),
        ("self", "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
         "cache", "use_cache", "kwargs"),
    ),
}

"""MultiheadAttention: torch.nn.MultiheadAttention's module (constructor, parameters, state_dict,
forward signature and return values) on the fused attention kernel."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import functional as FF
from .convert import twin_of
from .masks import merge_masks, pad_keep_columns


@twin_of(torch.nn.MultiheadAttention)
class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by ``fusedformer.attention``.

    Same constructor (``embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
    vdim, batch_first``), parameters and state_dict keys; ``forward`` takes and returns what
    torch's does. The differences, all in what it costs:

    - Self-attention is one packed projection; ``key is value`` (cross-attention on a memory) two.
      The heads are strided views that the kernel reads in place.
    - ``attn_mask`` and ``key_padding_mask`` are merged without expanding over heads; with
      ``is_causal=True`` (the hint that ``attn_mask`` is the causal mask) the kernel masks causally
      itself, also together with a ``key_padding_mask``, and the mask is not read.
    - ``need_weights=True`` (torch's default) must return the ``(N, H, L, S)`` probabilities, so
      they are formed explicitly: O(L * S) memory per head and a matmul/softmax/matmul sequence
      instead of the fused kernel. Pass ``need_weights=False`` for the fused path. The same explicit
      path is taken for float64 and for an additive mask that requires grad.
    - A query whose keys are all masked gets zero attention, with either path (torch.nn's fused
      path does the same, its ``need_weights=True`` path gives NaN).
    - With ``dropout > 0`` in training, the attention dropout is drawn by the fused kernel's own
      random generator (not torch's), so it is not bitwise torch's mask.
    - ``is_causal=True`` without ``attn_mask`` is accepted (causal masking); torch.nn raises.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        batched = self._check_inputs(query, key, value)
        if batched:
            n = query.size(0 if self.batch_first else 1)
            L, S = query.size(1 if self.batch_first else 0), key.size(1 if self.batch_first else 0)
        else:
            n, L, S = 1, query.size(0), key.size(0)
        mask, causal = self.prepare_masks(attn_mask, key_padding_mask, is_causal, need_weights, n, L, S, batched)
        if not batched:
            # unbatched (L, E): a batch of one in the batch_first layout
            query, key, value = _unsqueeze0(query, key, value)
        out, weights = self.forward_merged(
            query, key, value, mask, causal, need_weights, average_attn_weights,
            batch_first=self.batch_first if batched else True,
        )
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def forward_merged(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Optional[Tensor],
        is_causal: bool,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        batch_first: Optional[bool] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Batched inputs and a mask already merged by :meth:`prepare_masks` (the Transformer layers
        merge once and call this)."""
        return FF.multi_head_attention(
            query, key, value, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias,
            mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights, average_attn_weights=average_attn_weights,
            batch_first=self.batch_first if batch_first is None else batch_first,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            bias_k=self.bias_k, bias_v=self.bias_v, add_zero_attn=self.add_zero_attn,
        )

    def prepare_masks(
        self,
        attn_mask: Optional[Tensor],
        key_padding_mask: Optional[Tensor],
        is_causal: bool,
        need_weights: bool,
        n: int,
        L: int,
        S: int,
        batched: bool = True,
    ) -> Tuple[Optional[Tensor], bool]:
        """torch.nn's masks -> (fused mask, is_causal) for this module's key columns.

        torch.nn trusts the ``is_causal`` hint (drops ``attn_mask``) only without a padding mask and
        without weights; where it does not, it merges the given mask. When no key columns are
        appended, the hint and the mask describe the same thing, so the hint is used whenever it is
        given (the kernel then masks causally and only the padding mask is read). With appended
        columns, torch's choice is followed exactly.
        """
        extra = int(self.bias_k is not None) + int(bool(self.add_zero_attn))
        if is_causal and (extra == 0 or attn_mask is None or (key_padding_mask is None and not need_weights)):
            return merge_masks(None, key_padding_mask, batch=n, heads=self.num_heads, L=L, S=S, batched=batched), True
        mask = merge_masks(attn_mask, key_padding_mask, batch=n, heads=self.num_heads, L=L, S=S, batched=batched)
        return pad_keep_columns(mask, extra), False

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"MultiheadAttention: {name} must be a tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(
                "MultiheadAttention: query must be (L, E) unbatched or (N, L, E) / (L, N, E) batched, "
                f"got shape {tuple(query.shape)}"
            )
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"MultiheadAttention: {name} must have {query.dim()} dimensions like query, got shape {tuple(t.shape)}"
                )
        for name, t, want in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.size(-1) != want:
                raise ValueError(f"MultiheadAttention: {name} must have {want} features, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"MultiheadAttention: key and value must have the same batch and sequence sizes, got "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        bdim = 0 if self.batch_first else 1
        if batched and key.size(bdim) != query.size(bdim):
            raise ValueError(
                f"MultiheadAttention: key must have the batch size of query ({query.size(bdim)}), got shape "
                f"{tuple(key.shape)}"
            )
        return batched


def _unsqueeze0(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Add a batch dim, keeping the ``query is key is value`` identities the projections rely on."""
    q = query.unsqueeze(0)
    k = q if key is query else key.unsqueeze(0)
    if value is key:
        v = k
    elif value is query:
        v = q
    else:
        v = value.unsqueeze(0)
    return q, k, v

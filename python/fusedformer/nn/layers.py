"""TransformerEncoderLayer and TransformerDecoderLayer: torch.nn's layers (constructor, defaults,
submodules, state_dict, forward signature) computed with the fused attention and the fused
residual-add + norm.

Each residual step ``norm(x + branch)`` (post-norm) or ``x + branch`` followed by the next
``norm`` (pre-norm) is one pass of the fused norm kernel over the data instead of an add and a
norm. The masks are merged once per call (once per stack in TransformerEncoder/Decoder).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops._blocks import row_blocks
from ..ops.feed_forward import relu_feed_forward
from .attention import MultiheadAttention
from .convert import fuse_children_, twin_of
from .linear import call_linear, plain_linear
from .masks import seq_len
from .residual import fuses_residual, post_norm_add, pre_norm_add


def is_identity_dropout(dropout: torch.nn.Module) -> bool:
    """A ``torch.nn.Dropout`` that leaves its input as it is (eval mode, or p = 0)."""
    return isinstance(dropout, torch.nn.Dropout) and (not dropout.training or dropout.p == 0.0)


def apply_dropout(dropout: torch.nn.Module, x: Tensor) -> Tensor:
    return x if is_identity_dropout(dropout) else dropout(x)


def _is_relu(activation) -> bool:
    return activation is F.relu or type(activation) is torch.nn.ReLU


def _activate(layer: torch.nn.Module, h: Tensor) -> Tensor:
    """``layer.activation(h)`` on the output ``h`` of ``layer.linear1``: ReLU runs in place on it when
    ``linear1`` is a torch.nn.Linear, whose output is fresh and held by nothing else (the ReLU's
    backward needs only its result), saving an activation-sized buffer."""
    if _is_relu(layer.activation) and type(layer.linear1) is torch.nn.Linear:
        return torch.relu_(h)
    return layer.activation(h)


def _ff_block(layer: torch.nn.Module, x: Tensor, dropout_out: torch.nn.Module) -> Tensor:
    l1, l2 = layer.linear1, layer.linear2
    if _is_relu(layer.activation) and plain_linear(l1) and plain_linear(l2) and is_identity_dropout(layer.dropout):
        # ReLU in place on the fresh projection, and its backward in place on the fresh gradient
        h = relu_feed_forward(x, l1.weight, l1.bias, l2.weight, l2.bias)
    else:
        h = call_linear(l2, apply_dropout(layer.dropout, _activate(layer, call_linear(l1, x))))
    return apply_dropout(dropout_out, h)


def feed_forward_rows(layer: torch.nn.Module, x: Tensor, dropout_out: torch.nn.Module) -> Tensor:
    """``dropout_out(linear2(dropout(activation(linear1(x)))))`` over the tokens as rows of a
    ``(tokens, features)`` matrix.

    The linears run on 2-D rows so that their outputs are plain tensors rather than views, and ReLU
    runs in place on the fresh ``linear1`` output. The rows go in blocks whose
    ``dim_feedforward``-wide intermediate stays under ``MAX_BLOCK_BYTES`` (see
    fusedformer.ops._blocks); in inference the blocks write straight into the output.
    """
    x = x.flatten(0, -2)
    rows = x.size(0)
    block = row_blocks(rows, layer.linear1.out_features, x.dtype)
    if block >= rows:
        return _ff_block(layer, x, dropout_out)
    if not torch.is_grad_enabled() and type(layer.linear2) is torch.nn.Linear:
        out = x.new_empty(rows, layer.linear2.out_features)
        w2, b2 = layer.linear2.weight, layer.linear2.bias
        for r in range(0, rows, block):
            h = apply_dropout(layer.dropout, _activate(layer, call_linear(layer.linear1, x[r : r + block])))
            dst = out[r : r + block]
            if b2 is not None:
                torch.addmm(b2, h, w2.t(), out=dst)
            else:
                torch.mm(h, w2.t(), out=dst)
        return apply_dropout(dropout_out, out)
    return torch.cat([_ff_block(layer, xb, dropout_out) for xb in x.split(block)])


def feed_forward(layer: torch.nn.Module, x: Tensor, dropout_out: torch.nn.Module) -> Tensor:
    h = feed_forward_rows(layer, x, dropout_out)
    return h.view(x.shape[:-1] + h.shape[-1:])


def _residual_ff(layer: torch.nn.Module, normed: Tensor, residual: Tensor, dropout_out: torch.nn.Module) -> Tensor:
    """Pre-norm tail: ``residual + feed_forward(normed)``; the add is in place on the fresh output of
    ``linear2`` when nothing else can hold it."""
    ff = feed_forward_rows(layer, normed, dropout_out)
    if type(layer.linear2) is torch.nn.Linear and type(dropout_out) is torch.nn.Dropout and not ff._is_view():
        out = ff.add_(residual.flatten(0, -2))
    else:
        out = residual.flatten(0, -2) + ff
    return out.view(residual.shape)


def _batched(x: Tensor, batch_first: bool) -> Tuple[Tensor, bool]:
    """An unbatched ``(L, E)`` input as a batch of one in the batch_first layout."""
    if x.dim() == 2:
        return x.unsqueeze(0), True
    return x, batch_first


def _batch_size(x: Tensor, batch_first: bool) -> int:
    return 1 if x.dim() == 2 else x.size(0 if batch_first else 1)


@twin_of(torch.nn.TransformerEncoderLayer)
class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` on fusedformer's attention and norms.

    Same constructor (``d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=relu,
    layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True``), submodules and state_dict
    keys; a torch.nn state_dict loads strictly. ``forward(src, src_mask, src_key_padding_mask,
    is_causal)`` returns torch's output. No nested tensors are used: torch's eval fast path is
    replaced by the fused ops in every mode. If ``self_attn`` or the norms are replaced by modules
    that are not fusedformer's, torch.nn's forward runs instead.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        fuse_children_(self)

    def fusable(self) -> bool:
        return isinstance(self.self_attn, MultiheadAttention) and fuses_residual(self.norm1) and fuses_residual(
            self.norm2
        )

    def forward(
        self,
        src: Tensor,
        src_mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tensor:
        if not self.fusable() or src.is_nested:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        bf = self.self_attn.batch_first
        L = seq_len(src, bf)
        mask, causal = self.self_attn.prepare_masks(
            src_mask, src_key_padding_mask, is_causal, False, _batch_size(src, bf), L, L, src.dim() == 3
        )
        return self.forward_merged(src, mask, causal)

    def forward_merged(self, src: Tensor, mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """The layer on a mask already merged by ``self_attn.prepare_masks``."""
        x, bf = _batched(src, self.self_attn.batch_first)
        if self.norm_first:
            sa = self._sa(self.norm1(x), mask, is_causal, bf)
            normed, x = pre_norm_add(self.norm2, sa, x)
            x = _residual_ff(self, normed, x, self.dropout2)
        else:
            x = post_norm_add(self.norm1, self._sa(x, mask, is_causal, bf), x)
            x = post_norm_add(self.norm2, feed_forward(self, x, self.dropout2), x)
        return x.squeeze(0) if src.dim() == 2 else x

    def _sa(self, x: Tensor, mask: Optional[Tensor], is_causal: bool, bf: bool) -> Tensor:
        out = self.self_attn.forward_merged(x, x, x, mask, is_causal, batch_first=bf)[0]
        return apply_dropout(self.dropout1, out)


@twin_of(torch.nn.TransformerDecoderLayer)
class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` on fusedformer's attention and norms.

    Same constructor, submodules, state_dict keys and ``forward(tgt, memory, tgt_mask, memory_mask,
    tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal, memory_is_causal)``. The
    cross-attention projects the memory's keys and values with one matmul. If the attention modules
    or norms are replaced by modules that are not fusedformer's, torch.nn's forward runs instead.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        fuse_children_(self)

    def fusable(self) -> bool:
        return (
            isinstance(self.self_attn, MultiheadAttention)
            and isinstance(self.multihead_attn, MultiheadAttention)
            and all(fuses_residual(n) for n in (self.norm1, self.norm2, self.norm3))
        )

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        if not self.fusable():
            return super().forward(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                tgt_is_causal, memory_is_causal,
            )
        masks = self.prepare_masks(
            tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
            tgt_is_causal, memory_is_causal,
        )
        return self.forward_merged(tgt, memory, *masks)

    def prepare_masks(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor],
        memory_mask: Optional[Tensor],
        tgt_key_padding_mask: Optional[Tensor],
        memory_key_padding_mask: Optional[Tensor],
        tgt_is_causal: bool,
        memory_is_causal: bool,
    ) -> Tuple[Optional[Tensor], bool, Optional[Tensor], bool]:
        """(self-attention mask, causal, cross-attention mask, causal) in the fused convention."""
        bf = self.self_attn.batch_first
        n, L, S = _batch_size(tgt, bf), seq_len(tgt, bf), seq_len(memory, bf)
        batched = tgt.dim() == 3
        sm, sc = self.self_attn.prepare_masks(tgt_mask, tgt_key_padding_mask, tgt_is_causal, False, n, L, L, batched)
        mm, mc = self.multihead_attn.prepare_masks(
            memory_mask, memory_key_padding_mask, memory_is_causal, False, n, L, S, batched
        )
        return sm, sc, mm, mc

    def forward_merged(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor],
        tgt_is_causal: bool,
        memory_mask: Optional[Tensor],
        memory_is_causal: bool,
    ) -> Tensor:
        """The layer on masks already merged by :meth:`prepare_masks`."""
        x, bf = _batched(tgt, self.self_attn.batch_first)
        mem = memory.unsqueeze(0) if memory.dim() == 2 else memory
        if self.norm_first:
            sa = self._sa(self.norm1(x), tgt_mask, tgt_is_causal, bf)
            normed, x = pre_norm_add(self.norm2, sa, x)
            ca = self._mha(normed, mem, memory_mask, memory_is_causal, bf)
            normed, x = pre_norm_add(self.norm3, ca, x)
            x = _residual_ff(self, normed, x, self.dropout3)
        else:
            x = post_norm_add(self.norm1, self._sa(x, tgt_mask, tgt_is_causal, bf), x)
            x = post_norm_add(self.norm2, self._mha(x, mem, memory_mask, memory_is_causal, bf), x)
            x = post_norm_add(self.norm3, feed_forward(self, x, self.dropout3), x)
        return x.squeeze(0) if tgt.dim() == 2 else x

    def _sa(self, x: Tensor, mask: Optional[Tensor], is_causal: bool, bf: bool) -> Tensor:
        out = self.self_attn.forward_merged(x, x, x, mask, is_causal, batch_first=bf)[0]
        return apply_dropout(self.dropout1, out)

    def _mha(self, x: Tensor, mem: Tensor, mask: Optional[Tensor], is_causal: bool, bf: bool) -> Tensor:
        out = self.multihead_attn.forward_merged(x, mem, mem, mask, is_causal, batch_first=bf)[0]
        return apply_dropout(self.dropout2, out)

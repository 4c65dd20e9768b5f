"""TransformerEncoder, TransformerDecoder and Transformer: torch.nn's stacks on fusedformer's layers,
with the masks merged once per stack rather than once per layer."""

import warnings
from typing import Optional

import torch
from torch import Tensor

from .convert import fuse_children_, twin_of
from .layers import TransformerDecoderLayer, TransformerEncoderLayer, _batch_size
from .masks import detect_is_causal, generate_square_subsequent_mask, seq_len


def _same_attention(layers, attr: str) -> bool:
    """Whether every layer's attention takes the same merged mask (same heads, no appended keys)."""
    mods = [getattr(layer, attr) for layer in layers]
    return all(
        m.num_heads == mods[0].num_heads and m.bias_k is None and not m.add_zero_attn for m in mods
    )


@twin_of(torch.nn.TransformerEncoder)
class TransformerEncoder(torch.nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder`` on fusedformer's layers.

    Same constructor (``encoder_layer, num_layers, norm=None, enable_nested_tensor=True,
    mask_check=True``), state_dict and ``forward(src, mask, src_key_padding_mask, is_causal)``.
    torch.nn layers and norms given to it are converted in place to their fusedformer twins. Nested
    tensors are never used (``enable_nested_tensor`` is kept for compatibility only): where torch's
    eval fast path would return zeros at padded positions, this returns the values computed there,
    which no unpadded position depends on.
    """

    def __init__(self, *args, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            super().__init__(*args, **kwargs)
        fuse_children_(self)

    def forward(
        self,
        src: Tensor,
        mask: Optional[Tensor] = None,
        src_key_padding_mask: Optional[Tensor] = None,
        is_causal: Optional[bool] = None,
    ) -> Tensor:
        layers = list(self.layers)
        first = layers[0]
        bf = first.self_attn.batch_first
        L = seq_len(src, bf)
        is_causal = detect_is_causal(mask, is_causal, L)
        output = src
        if all(isinstance(m, TransformerEncoderLayer) and m.fusable() for m in layers) and _same_attention(
            layers, "self_attn"
        ):
            merged, causal = first.self_attn.prepare_masks(
                mask, src_key_padding_mask, is_causal, False, _batch_size(src, bf), L, L, src.dim() == 3
            )
            for mod in layers:
                output = mod.forward_merged(output, merged, causal)
        else:
            for mod in layers:
                output = mod(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


@twin_of(torch.nn.TransformerDecoder)
class TransformerDecoder(torch.nn.TransformerDecoder):
    """``torch.nn.TransformerDecoder`` on fusedformer's layers: same constructor (``decoder_layer,
    num_layers, norm=None``), state_dict and ``forward(tgt, memory, tgt_mask, memory_mask,
    tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal, memory_is_causal)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        fuse_children_(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        tgt_is_causal: Optional[bool] = None,
        memory_is_causal: bool = False,
    ) -> Tensor:
        layers = list(self.layers)
        first = layers[0]
        tgt_is_causal = detect_is_causal(tgt_mask, tgt_is_causal, seq_len(tgt, first.self_attn.batch_first))
        output = tgt
        if (
            all(isinstance(m, TransformerDecoderLayer) and m.fusable() for m in layers)
            and _same_attention(layers, "self_attn")
            and _same_attention(layers, "multihead_attn")
        ):
            masks = first.prepare_masks(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                tgt_is_causal, memory_is_causal,
            )
            for mod in layers:
                output = mod.forward_merged(output, memory, *masks)
        else:
            for mod in layers:
                output = mod(
                    output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal,
                )
        if self.norm is not None:
            output = self.norm(output)
        return output


@twin_of(torch.nn.Transformer)
class Transformer(torch.nn.Transformer):
    """``torch.nn.Transformer`` on fusedformer's encoder and decoder: same constructor (``d_model=512,
    nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048, dropout=0.1,
    activation=relu, custom_encoder=None, custom_decoder=None, layer_norm_eps=1e-5, batch_first=False,
    norm_first=False, bias=True``), state_dict, ``forward`` and ``generate_square_subsequent_mask``.
    torch.nn submodules (also inside a custom encoder/decoder) are converted to their twins."""

    def __init__(self, *args, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            super().__init__(*args, **kwargs)
        fuse_children_(self)

    @staticmethod
    def generate_square_subsequent_mask(
        sz: int, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> Tensor:
        """The float causal mask: ``-inf`` above the diagonal, 0 elsewhere (torch.nn's)."""
        return generate_square_subsequent_mask(sz, device=device, dtype=dtype)

"""Helpers shared by the HuggingFace twins: packed projection weights and the attention call with
the masking rules of transformers' ``sdpa`` integration."""

import inspect
import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...ops import attention, linear
from ...ops.quantized_linear import quantized_linear
from ..quantized import QuantizedLinear

# transformers 5.24 renamed the KV-cache parameter of the modules' forwards from ``past_key_values`` to
# ``cache`` (at the same position; the old name stays as a deprecated keyword). The twins take it under
# either name and pass it on under the name of the installed version.
CACHE_NAMES = ("cache", "past_key_values")


def cache_arg(cls: type) -> str:
    """The name under which ``cls.forward`` (a transformers module) takes the KV cache."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def take_cache(cache, kwargs: dict):
    """The KV cache passed to a twin's forward: its ``cache`` parameter (filled positionally or under
    the new name) or the old ``past_key_values`` keyword, which is removed from ``kwargs``."""
    old = kwargs.pop("past_key_values", None)
    return cache if cache is not None else old


# module -> (key, packed weight, packed bias); weak, so it never outlives the module, and outside
# the module, so it is not in its state_dict, pickles or deep copies.
_PACKED = weakref.WeakKeyDictionary()


def packed_linear(owner: torch.nn.Module, linears: Sequence[torch.nn.Linear]) -> Tuple[Tensor, Optional[Tensor]]:
    """The weights and biases of ``linears`` concatenated along the output features, for one matmul.

    With autograd recording (or under torch.compile) they are concatenated on every call, so
    gradients reach the original parameters. In inference the result is cached per module and
    recomputed only when a weight changes (in place, ``.to()``, a loaded state_dict), at the cost
    of one copy of the projection weights.
    """
    ws = [lin.weight for lin in linears]
    bs = [lin.bias for lin in linears]
    has_bias = all(b is not None for b in bs)
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws) or torch.compiler.is_compiling():
        return torch.cat(ws), (torch.cat(bs) if has_bias else None)
    key = _cache_key(ws + (bs if has_bias else []))
    hit = _PACKED.get(owner)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.no_grad():
        w = torch.cat(ws)
        b = torch.cat(bs) if has_bias else None
    if key is not None:
        _PACKED[owner] = (key, w, b)
    return w, b


def _cache_key(tensors) -> Optional[tuple]:
    """What identifies the contents of ``tensors``: their storage and version counters; None when
    one of them has no version counter (an inference tensor, e.g. a weight computed on the fly under
    ``torch.inference_mode``), which is then never cached."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


# module -> (key, packed qweight, scale, bias, scheme) of its quantized projections
_PACKED_QUANTIZED = weakref.WeakKeyDictionary()


def packed_projection(owner: torch.nn.Module, linears: Sequence[torch.nn.Module], x: Tensor) -> Tensor:
    """The outputs of ``linears`` on ``x`` concatenated along the features, in one product: float
    layers by their packed weights (:func:`packed_linear`); ``QuantizedLinear`` layers of one scheme
    (``fusedformer.quantize``) by their packed quantized weights and scales, so that a quantized
    model's q/k/v projections stay quantized (an int8 row is quantized once for the three). The
    packed quantized weights are cached per module as :func:`packed_linear` caches float ones. Layers
    with forward hooks are each called instead, so that the hooks see their inputs and outputs."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in linears):
        return torch.cat([m(x) for m in linears], dim=-1)  # each layer called, so that its hooks run
    if not all(type(m) is QuantizedLinear for m in linears) or len({(m.scheme, m.group_size) for m in linears}) != 1:
        return linear(x, *packed_linear(owner, linears))
    has_bias = any(m.bias is not None for m in linears)
    parts = [t for m in linears for t in (m.qweight, m.scale) + ((m.bias,) if m.bias is not None else ())]
    key = _cache_key(parts)
    hit = _PACKED_QUANTIZED.get(owner)
    if key is not None and hit is not None and hit[0] == key:
        q, s, b, scheme = hit[1:]
    else:
        with torch.no_grad():
            q = torch.cat([m.qweight for m in linears])
            s = torch.cat([m.scale for m in linears])
            b = torch.cat([m.bias if m.bias is not None else m.scale.new_zeros(m.out_features)
                           for m in linears]) if has_bias else None
        scheme = linears[0].scheme
        if key is not None:
            _PACKED_QUANTIZED[owner] = (key, q, s, b, scheme)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return quantized_linear(x, q, s, b, scheme)


def causal_for(module: torch.nn.Module, q_len: int, mask: Optional[Tensor], is_causal: Optional[bool]) -> bool:
    """transformers' sdpa rule: causal masking by the kernel only without a mask, for more than one
    query, and when the module (or the ``is_causal`` keyword) says so."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(q_len > 1 and mask is None and is_causal)


def attend(
    module: torch.nn.Module,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor],
    dropout: float,
    scaling: Optional[float],
    is_causal: Optional[bool] = None,
) -> Tensor:
    """Attention over ``(B, H, L, E)`` / ``(B, Hkv, S, E)`` tensors with an HF mask: the sdpa format
    (bool, True = keep) and the eager format (additive float) are both the fused kernel's. Grouped
    key/value heads are read in place (no ``repeat_kv``). Returns ``(B, H, L, E)``."""
    L, S = q.size(-2), k.size(-2)
    causal = causal_for(module, L, mask, is_causal)
    if causal and S > L:
        # as transformers does for a prefill into a longer (static) cache
        k, v = k[..., :L, :], v[..., :L, :]
    return attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling,
        enable_gqa=q.size(-3) != k.size(-3),
    )


def native_masks(module: torch.nn.Module) -> bool:
    """Whether the model's attention implementation builds masks the fused kernel does not take
    (flash / flex formats): then transformers' own forward runs."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    return impl not in (None, "sdpa", "eager")


def capturing_outputs() -> bool:
    """Whether transformers is recording intermediate outputs (``output_hidden_states`` /
    ``output_attentions``) through module hooks in the current call."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a layout without the collector: assume it may be recording
        return True
    return bool(_active_collector.get())

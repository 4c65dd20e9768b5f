"""How the ops behave under ``torch.autocast`` (CPU and CUDA).

- ``attention`` is a lower-precision op, like ``F.scaled_dot_product_attention``: float32 (and
  other non-float64 floating) query, key and value are cast to the autocast dtype; the mask is left
  as given (an additive mask is used in the compute type anyway). Gradients flow back through the
  casts to the caller's dtype.
- ``layer_norm`` / ``rms_norm`` with ``residual`` promote: when input and residual differ in dtype
  (a bfloat16 branch added to a float32 residual stream), both are cast to the wider one, as
  ``input + residual`` would be. Without a residual they run in the input's dtype (they accumulate
  in float32 whatever that is); weight and bias may have any floating dtype.
- ``softmax`` runs in its input's dtype (it accumulates in float32).
- ``gelu`` runs in its input's dtype, like ``F.gelu`` (bfloat16 / float16 are computed in float32);
  it has no autocast kernel.
- ``linear`` is a lower-precision op, like ``F.linear``: input, weight and bias are cast to the
  autocast dtype.
"""

import torch

_ops = torch.ops.fusedformer
_lib = torch.library.Library("fusedformer", "IMPL")  # noqa: TOR901 - kernels for the autocast keys


def _autocast_dtype(device_type):
    return torch.get_autocast_dtype(device_type)


def _exclude(key):
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key))


def _lower(t, dtype):
    if t is not None and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _promote(a, b):
    if b is None or a.dtype == b.dtype:
        return a, b
    wide = torch.promote_types(a.dtype, b.dtype)
    return a.to(wide), b.to(wide)


def _register(device_type):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def attention_fwd(query, key_, value, attn_mask, dropout_p, is_causal, scale, seed):
        dtype = _autocast_dtype(device_type)
        with _exclude(key):
            return _ops.attention_fwd(
                _lower(query, dtype), _lower(key_, dtype), _lower(value, dtype), attn_mask, dropout_p, is_causal,
                scale, seed,
            )

    def layer_norm_fwd(input, normalized_shape, weight, bias, eps, residual):
        input, residual = _promote(input, residual)
        with _exclude(key):
            return _ops.layer_norm_fwd(input, normalized_shape, weight, bias, eps, residual)

    def rms_norm_fwd(input, normalized_shape, weight, eps, residual):
        input, residual = _promote(input, residual)
        with _exclude(key):
            return _ops.rms_norm_fwd(input, normalized_shape, weight, eps, residual)

    def linear(input, weight, bias):
        dtype = _autocast_dtype(device_type)
        with _exclude(key):
            return _ops.linear(_lower(input, dtype), _lower(weight, dtype), _lower(bias, dtype))

    dispatch_key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    _lib.impl("attention_fwd", attention_fwd, dispatch_key)
    _lib.impl("layer_norm_fwd", layer_norm_fwd, dispatch_key)
    _lib.impl("rms_norm_fwd", rms_norm_fwd, dispatch_key)
    _lib.impl("linear", linear, dispatch_key)


_register("cpu")
_register("cuda")

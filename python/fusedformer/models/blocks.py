"""The blocks the three models share, built on the fused ops: norms with the fused residual form,
rotary embeddings, grouped-query self-/cross-attention with a KV cache, GELU/ReLU/SwiGLU MLPs, and one
Transformer block (pre-norm or post-norm, with optional cross-attention)."""

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.decode_layer import ACTIVATIONS as DECODE_ACTIVATIONS
from ..ops.decode_layer import FUSED_GELU_ROWS as DECODE_GELU_ROWS
from ..nn.linear import Linear
from ..nn.quantized import QuantizedLinear
from ..nn.residual import post_norm_add, pre_norm_add
from ..ops.feed_forward import relu_feed_forward
from .paged import PagedKVCache, paged_self_attention


class Norm(nn.Module):
    """LayerNorm (with bias) or RMSNorm over the last dim. ``forward(x, residual)`` returns
    ``(norm(x + residual), x + residual)`` from one fused pass; without residual, ``norm(x)``: the
    convention of fusedformer.nn.residual, whose helpers the blocks call."""

    _fusedformer_residual = True
    fused = True  # False: the same computation from plain PyTorch functions (see ``set_fused``)

    def __init__(self, d: int, kind: str = "layernorm", eps: float = 1e-5):
        super().__init__()
        self.kind, self.eps, self.d = kind, eps, d
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layernorm" else None

    def forward(self, x, residual=None):
        if not self.fused:
            h = x if residual is None else x + residual
            y = F.layer_norm(h, (self.d,), self.weight, self.bias, self.eps) if self.kind == "layernorm" \
                else F.rms_norm(h, (self.d,), self.weight, self.eps)
            return y if residual is None else (y, h)
        if self.kind == "layernorm":
            return ops.layer_norm(x, self.d, self.weight, self.bias, self.eps, residual=residual)
        return ops.rms_norm(x, self.d, self.weight, self.eps, residual=residual)

    def extra_repr(self):
        return f"{self.d}, {self.kind}, eps={self.eps}"


class MLP(nn.Module):
    """Position-wise feed-forward: ``down(act(up(x)))``, or SwiGLU ``down(silu(gate(x)) * up(x))`` with gate
    and up in one matmul (rows [gate; up]). GELU (exact or tanh) is the fused ``ops.gelu``; ReLU is
    ``fusedformer.ops.feed_forward.relu_feed_forward`` (the ReLU and its backward in place)."""

    fused = True  # False: GELU from F.gelu (see ``set_fused``)

    def __init__(self, d: int, d_ff: int, activation: str, bias: bool = True):
        super().__init__()
        self.activation = activation
        self.up = Linear(d, 2 * d_ff if activation == "swiglu" else d_ff, bias=bias)
        self.down = Linear(d_ff, d, bias=bias)

    def forward(self, x):
        if self.activation == "relu" and self.fused and all(
            m.fused and not (m._forward_hooks or m._forward_pre_hooks) for m in (self.up, self.down)
        ):
            # ReLU in place on the fresh projection, and (with autograd) its backward in place too
            return relu_feed_forward(x, self.up.weight, self.up.bias, self.down.weight, self.down.bias)
        h = self.up(x)
        # without autograd the activations overwrite the projection (no second d_ff-wide buffer,
        # none of its page faults)
        inplace = not torch.is_grad_enabled()
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate).mul_(up) if inplace else F.silu(gate) * up
        elif self.activation in ("gelu_tanh", "gelu"):
            approximate = "tanh" if self.activation == "gelu_tanh" else "none"
            # the fused tanh GELU is 3-5x ATen's forward and backward; the exact one 1.5x in the
            # backward but 0.8x in the forward, so inference keeps ATen's in-place exact GELU, except
            # for a decode step's few rows, where ATen's sets up a oneDNN primitive on every call
            # (ops.decode_layer does the same)
            few_rows = h.numel() <= DECODE_GELU_ROWS * h.shape[-1]
            if self.fused and (approximate == "tanh" or few_rows) and inplace and h.is_contiguous():
                h = ops.gelu_(h, approximate)
            elif self.fused and (approximate == "tanh" or not inplace):
                h = ops.gelu(h, approximate)
            else:
                h = torch.ops.aten.gelu_(h, approximate=approximate) if inplace else F.gelu(h, approximate=approximate)
        else:
            h = F.relu(h, inplace=inplace)
        return self.down(h)


class Rotary(nn.Module):
    """Rotary position embedding (the rotate-half convention): cos/sin tables for given position ids."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, L) -> cos, sin (B, 1, L, head_dim) in ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, E) rotated: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values of every attention layer, plus the key-validity mask.

    ``k``/``v``: (n_layer, B, Hkv, max_len, E); ``mask``: (B, max_len) bool (False = padding);
    ``length``: filled positions. Cross-attention keys/values of the encoder output (``cross_k``,
    ``cross_v``) are computed once, at the first decoder step, and kept.
    """

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype, device, cross=False):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len
        self.cross_k = [None] * n_layer if cross else None
        self.cross_v = [None] * n_layer if cross else None
        # (model key, each block's ops.decode_layer arguments or None): see GPT._decode_plans
        self.decode_plans = None

    @property
    def batch(self):
        return self.k.shape[1]

    def reserve(self, n: int) -> Tuple[int, int]:
        """The positions [start, end) that the next n tokens take."""
        start = self.length
        if start + n > self.max_len:
            raise ValueError(f"KVCache: {start} cached + {n} new tokens exceed its max_len {self.max_len}")
        return start, start + n

    def key_mask(self, end: int) -> torch.Tensor:
        """(B, 1, 1, end) bool view: which keys are valid."""
        return self.mask[:, None, None, :end]

    def reorder(self, index: torch.Tensor):
        """Keep the batch rows ``index`` (beam search): rows are gathered in place over the filled part."""
        n = self.length
        self.k[:, :, :, :n] = self.k[:, index, :, :n]
        self.v[:, :, :, :n] = self.v[:, index, :, :n]
        self.mask[:, :n] = self.mask[index, :n]


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (n_kv_head divides n_head) on ops.attention.

    Self-attention projects q, k, v in one matmul (rows [q; k; v]); cross-attention (``cross=True``)
    projects q from x and k, v (rows [k; v]) from the memory.
    """

    fused = True  # False: torch.nn.functional.scaled_dot_product_attention (see ``set_fused``)

    def __init__(self, d_model, n_head, n_kv_head=None, head_dim=None, bias=True, out_bias=True, cross=False):
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.head_dim = head_dim or d_model // n_head
        self.cross = cross
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        if cross:
            self.q = Linear(d_model, q_dim, bias=bias)
            self.kv = Linear(d_model, 2 * kv_dim, bias=bias)
        else:
            self.qkv = Linear(d_model, q_dim + 2 * kv_dim, bias=bias)
        self.out = Linear(q_dim, d_model, bias=out_bias)

    def _heads(self, t, n):
        """(B, L, n * E) -> (B, n, L, E), a view."""
        B, L, _ = t.shape
        return t.view(B, L, n, self.head_dim).transpose(1, 2)

    def forward(self, x, *, rope=None, attn_mask=None, is_causal=False, dropout_p=0.0, cache=None, layer=0,
                memory=None):
        """x (B, L, D). ``rope``: (cos, sin) for x's positions. ``attn_mask``: bool (True = keep) broadcastable
        to (B, H, L, S). With ``cache`` (self-attention), k and v are written at the cache's next positions
        and attention runs over all cached keys (``cache.length`` advances in the model, once per step).
        Cross-attention attends to ``memory`` (B, S, D), or to the cache's stored keys of it."""
        if isinstance(cache, PagedKVCache):
            return self._forward_paged(x, rope, cache, layer)
        B, L, _ = x.shape
        H, Hkv, E = self.n_head, self.n_kv_head, self.head_dim
        if self.cross:
            q = self._heads(self.q(x), H)
            if cache is not None and cache.cross_k[layer] is not None:
                k, v = cache.cross_k[layer], cache.cross_v[layer]
            else:
                kv = self.kv(memory).view(B, memory.shape[1], 2, Hkv, E)
                k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
                if cache is not None:
                    cache.cross_k[layer], cache.cross_v[layer] = k, v
        else:
            qkv = self.qkv(x)
            q, k, v = qkv.split([H * E, Hkv * E, Hkv * E], dim=-1)
            q, k, v = self._heads(q, H), self._heads(k, Hkv), self._heads(v, Hkv)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                start, end = cache.reserve(L)
                kc, vc = cache.k[layer], cache.v[layer]
                kc[:, :, start:end] = k
                vc[:, :, start:end] = v
                k, v = kc[:, :, :end], vc[:, :, :end]
                if start > 0 and L > 1:  # a chunk after cached tokens: causal within, all of the past
                    causal = torch.ones(L, end, dtype=torch.bool, device=x.device).tril_(start)
                    attn_mask = causal if attn_mask is None else attn_mask & causal
                    is_causal = False
                elif L == 1:
                    is_causal = False
        if self.fused:
            y = ops.attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              enable_gqa=Hkv != H)
        else:
            if attn_mask is not None and is_causal:  # PyTorch takes one or the other
                attn_mask = attn_mask & torch.ones(L, k.shape[2], dtype=torch.bool, device=x.device).tril_()
                is_causal = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal, enable_gqa=Hkv != H)
        return self.out(y.transpose(1, 2).reshape(B, L, H * E))

    def _forward_paged(self, x, rope, cache: PagedKVCache, layer: int):
        """x (T, D): the tokens of a packed step (see fusedformer.models.paged); ``rope``: (cos, sin) of
        shape (T, 1, E)."""
        T = x.shape[0]
        H, Hkv, E = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * E, Hkv * E, Hkv * E], dim=-1)
        q, k, v = q.view(T, H, E), k.view(T, Hkv, E), v.view(T, Hkv, E)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = paged_self_attention(q, k, v, cache, layer, 1.0 / math.sqrt(E))
        return self.out(y.reshape(T, H * E))


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _projection(m: nn.Module, dtype: torch.dtype):
    """(scheme, [weight, scale, bias]) of a projection as ops.decode_layer takes it (scheme "" for a
    float one on fusedformer.linear; GPT makes it "torch" where that sends the rows to torch's), or
    None for a module whose call it would not reproduce."""
    if _hooked(m):
        return None
    if type(m) is Linear and m.fused:
        return "", [m.weight, None, m.bias]
    if type(m) is QuantizedLinear:
        b = m.bias
        return m.scheme, [m.qweight, m.scale, b if b is None or b.dtype == dtype else b.to(dtype)]
    return None


class Block(nn.Module):
    """One Transformer layer: self-attention, optional cross-attention, MLP.

    Pre-norm (``norm_first``): the residual stream ``h`` and the pending sublayer output ``delta`` travel
    together, so that each ``h + delta`` is fused with the next norm; ``forward`` returns the new
    ``(h, delta)`` (the caller closes the stack with :func:`close_stack`). Post-norm:
    ``h = norm(h + sublayer(h))``, fused the same way; ``delta`` is None.
    """

    def __init__(self, d_model, n_head, d_ff, *, n_kv_head=None, head_dim=None, norm="layernorm", norm_eps=1e-5,
                 activation="gelu", attn_bias=True, out_bias=True, mlp_bias=True, norm_first=True, cross=False,
                 dropout=0.0):
        super().__init__()
        self.norm_first = norm_first
        self.dropout = dropout
        self.attn = Attention(d_model, n_head, n_kv_head, head_dim, attn_bias, out_bias)
        self.norm_attn = Norm(d_model, norm, norm_eps)
        self.cross_attn = Attention(d_model, n_head, n_kv_head, head_dim, attn_bias, out_bias, cross=True) \
            if cross else None
        self.norm_cross = Norm(d_model, norm, norm_eps) if cross else None
        self.mlp = MLP(d_model, d_ff, activation, mlp_bias)
        self.norm_mlp = Norm(d_model, norm, norm_eps)

    # False: decoding calls the block's modules one by one, never ops.decode_layer (for comparisons)
    fused_decode = True

    def _drop(self, t):
        return F.dropout(t, self.dropout, self.training) if self.dropout > 0 else t

    def decode_plan(self, dtype: torch.dtype):
        """The arguments of ``ops.decode_layer`` that compute this block (``params``, ``schemes`` and
        the keywords n_head, rms, eps, activation), or None where the op would not compute what the
        modules do: a cross-attention or post-norm block, dropout in training, forward hooks, a module
        replaced or switched to plain PyTorch (``set_fused``)."""
        attn, mlp = self.attn, self.mlp
        if not (self.fused_decode and self.norm_first and self.cross_attn is None
                and (self.dropout == 0 or not self.training)):
            return None
        if type(attn) is not Attention or not attn.fused or type(mlp) is not MLP or not mlp.fused \
                or mlp.activation not in DECODE_ACTIVATIONS:
            return None
        na, nm = self.norm_attn, self.norm_mlp
        if any(type(n) is not Norm or not n.fused or _hooked(n) for n in (na, nm)) \
                or (na.kind, na.eps) != (nm.kind, nm.eps) or any(_hooked(m) for m in (self, attn, mlp)):
            return None
        projections = [_projection(m, dtype) for m in (attn.qkv, attn.out, mlp.up, mlp.down)]
        if any(p is None for p in projections):
            return None
        (s_qkv, qkv), (s_out, out), (s_up, up), (s_down, down) = projections
        params = [na.weight, na.bias, *qkv, *out, nm.weight, nm.bias, *up, *down]
        return params, [s_qkv, s_out, s_up, s_down], dict(n_head=attn.n_head, rms=na.kind == "rmsnorm",
                                                          eps=na.eps, activation=mlp.activation)

    def forward(self, h, delta=None, *, rope=None, attn_mask=None, is_causal=False, cache=None, layer=0,
                memory=None, memory_mask=None):
        p = self.dropout if self.training else 0.0
        sublayers = [(self.norm_attn, lambda a: self.attn(a, rope=rope, attn_mask=attn_mask, is_causal=is_causal,
                                                          dropout_p=p, cache=cache, layer=layer))]
        if self.cross_attn is not None:
            sublayers.append((self.norm_cross, lambda a: self.cross_attn(a, attn_mask=memory_mask, dropout_p=p,
                                                                         cache=cache, layer=layer, memory=memory)))
        sublayers.append((self.norm_mlp, self.mlp))
        if self.norm_first:
            for norm, f in sublayers:
                if delta is None:
                    a = norm(h)
                else:
                    a, h = pre_norm_add(norm, delta, h)
                delta = self._drop(f(a))
            return h, delta
        for norm, f in sublayers:
            h = post_norm_add(norm, self._drop(f(h)), h)
        return h, None


def close_stack(norm: Norm, h: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
    """The last norm of a stack of blocks: ``norm(h + delta)`` with the pending sublayer output of
    pre-norm blocks (fused), ``norm(h)`` after post-norm ones (``delta`` None)."""
    return norm(h) if delta is None else post_norm_add(norm, delta, h)


def set_fused(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch a model between the fused ops and plain PyTorch (F.layer_norm / F.rms_norm, an unfused
    residual add, F.scaled_dot_product_attention, F.linear, F.gelu): the same model and weights, for comparisons."""
    for m in model.modules():
        if isinstance(m, (Norm, Attention, Linear, MLP)):
            m.fused = fused
    return model


def init_weights(module: nn.Module, std: float = 0.02, n_layer: Optional[int] = None):
    """GPT-2-style initialisation: normal(0, std) weights, zero biases, unit norms; output projections
    scaled by 1/sqrt(2 n_layer)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            s = std / math.sqrt(2 * n_layer) if n_layer and (name.endswith(".out") or name.endswith(".down")) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, Norm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

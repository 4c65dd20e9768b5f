"""Plain-PyTorch references of every fused op, computed in float64 on the CPU.

They define the semantics the kernels must match (tests) and validate benchmark outputs. Each
takes the arguments of the fused op and returns float64 CPU tensors (use ``.to(dtype)`` to compare).
"""

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def _masked_logits(z, mask, is_causal):
    """z + mask (additive) or z where mask (bool), and the causal rule on the last two dims."""
    if mask is not None:
        mask = mask.detach().cpu()
        if mask.dtype == torch.bool:
            z = z.masked_fill(~mask, float("-inf"))
        else:
            z = z + mask.to(torch.float64)
    if is_causal:
        L, S = z.shape[-2], z.shape[-1]
        keep = torch.ones(L, S, dtype=torch.bool).tril()
        z = z.masked_fill(~keep, float("-inf"))
    return z


def _softmax_zero_masked(z, dim):
    """softmax where a row with every entry -inf gives zeros instead of NaN."""
    all_masked = torch.isneginf(z).all(dim=dim, keepdim=True)
    p = torch.softmax(z.masked_fill(all_masked, 0.0), dim=dim)
    return p.masked_fill(all_masked, 0.0)


def softmax(x, dim=-1, *, scale=1.0, mask=None, is_causal=False):
    z = _f64(x) * scale
    z = _masked_logits(z, mask, is_causal)
    return _softmax_zero_masked(z, dim)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    x = _f64(input)
    h = None
    if residual is not None:
        # the unfused code adds in the input dtype, then normalizes the rounded sum
        h_low = input.detach().cpu() + residual.detach().cpu()
        h = _f64(h_low)
        x = h
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    out = torch.nn.functional.layer_norm(x, tuple(normalized_shape), _f64(weight), _f64(bias), eps)
    return (out, h) if residual is not None else out


def rms_norm(input, normalized_shape, weight=None, eps=None, *, residual=None):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    x = _f64(input)
    h = None
    if residual is not None:
        h = _f64(input.detach().cpu() + residual.detach().cpu())
        x = h
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    out = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        out = out * _f64(weight)
    return (out, h) if residual is not None else out


def gelu(input, approximate="none"):
    return torch.nn.functional.gelu(_f64(input), approximate=approximate)


def attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    dropout_mask: Optional[torch.Tensor] = None,
):
    """Scaled dot-product attention in float64, differentiable in query, key and value (leaf float64
    inputs give reference gradients). ``dropout_mask`` (bool, True = keep, broadcast to
    (..., H, L, S)) replaces random dropout so the fused kernel's mask can be checked exactly."""
    q, k, v = (t.to("cpu", torch.float64) for t in (query, key, value))
    if q.dim() >= 3 and k.size(-3) != q.size(-3):
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    z = (q @ k.transpose(-2, -1)) * scale
    z = _masked_logits(z, attn_mask, is_causal)
    p = _softmax_zero_masked(z, -1)
    if dropout_mask is not None:
        p = p * dropout_mask.cpu().to(torch.float64) / (1.0 - dropout_p)
    return p @ v


# ---------------------------------------------------------------------------------------------
# The dropout mask of the attention kernels (Philox-4x32-10, see csrc/include/fusedformer/philox.h),
# recomputed in NumPy so that tests can check dropout exactly.


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    W0, W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
    mask32 = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint32) for x in (c0, c1, c2, c3)]
    k0 = np.asarray(k0, dtype=np.uint32)
    k1 = np.asarray(k1, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = M0 * c[0].astype(np.uint64)
            p1 = M1 * c[2].astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), (p0 & mask32).astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), (p1 & mask32).astype(np.uint32)
            c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
            k0 = (k0 + W0).astype(np.uint32)
            k1 = (k1 + W1).astype(np.uint32)
    return c


def dropout_keep_mask(seed: Union[int, torch.Tensor], batch_heads: int, L: int, S: int, p: float) -> torch.Tensor:
    """Bool (batch_heads, L, S): True where the attention kernels keep an element, for the given seed."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    seed_u = seed & 0xFFFFFFFFFFFFFFFF
    bh = np.arange(batch_heads, dtype=np.uint64)[:, None, None]
    i = np.arange(L, dtype=np.uint32)[None, :, None]
    j = np.arange(S, dtype=np.uint32)[None, None, :]
    shape = (batch_heads, L, S)
    col4 = np.broadcast_to(j >> np.uint32(2), shape)
    rows = np.broadcast_to(i, shape)
    bh_lo = np.broadcast_to((bh & np.uint64(0xFFFFFFFF)).astype(np.uint32), shape)
    bh_hi = np.broadcast_to((bh >> np.uint64(32)).astype(np.uint32), shape)
    out = _philox4x32_10(col4, rows, bh_lo, bh_hi, np.uint32(seed_u & 0xFFFFFFFF), np.uint32(seed_u >> 32))
    lane = np.broadcast_to(j & np.uint32(3), shape)
    bits = np.choose(lane, out)
    t = p * 4294967296.0
    threshold = 0xFFFFFFFF if t >= 4294967295.0 else int(t)
    return torch.from_numpy(bits >= np.uint32(threshold))


# ---------------------------------------------------------------------------------------------
# Paged KV cache (fusedformer.ops.paged_cache_write / paged_attention).


def paged_cache_write(key, value, key_cache, value_cache, slot_mapping):
    """The caches after writing token t's key and value rows at slot_mapping[t] (negative: skipped),
    as new float64 tensors; the inputs are left alone."""
    kc, vc = _f64(key_cache).clone(), _f64(value_cache).clone()
    bs = kc.size(2)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            kc[slot // bs, :, slot % bs] = _f64(key[t])
            vc[slot // bs, :, slot % bs] = _f64(value[t])
    return kc, vc


def gather_paged(cache, block_table, seq_len):
    """The first seq_len tokens of one sequence's cache as a contiguous (num_kv_heads, seq_len, head_dim)
    tensor: its blocks block_table[:ceil(seq_len / block_size)] laid end to end."""
    bs = cache.size(2)
    nb = -(-int(seq_len) // bs)
    blocks = cache[block_table[:nb].to(cache.device, torch.long)]  # (nb, Hkv, bs, E)
    return blocks.permute(1, 0, 2, 3).reshape(cache.size(1), nb * bs, cache.size(3))[:, : int(seq_len)]


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale=None, *,
                    dtype=torch.float64):
    """Attention of each sequence's queries (the last tokens of its context) over its gathered cache,
    causal with bottom-right alignment, GQA by repeating the key/value heads; (T, num_heads, head_dim).
    Computed in float64, or in ``dtype`` (a low-precision peer for the pass rule)."""
    q = query.detach().to("cpu", dtype)
    kc, vc = (c.detach().to("cpu", dtype) for c in (key_cache, value_cache))
    T, Hq, E = q.shape
    rep = Hq // kc.size(1)
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    out = torch.zeros(T, Hq, E, dtype=dtype)
    starts = query_start_loc.tolist()
    for b, S in enumerate(seq_lens.tolist()):
        t0, t1 = starts[b], starts[b + 1]
        L = t1 - t0
        if L == 0:
            continue
        k = gather_paged(kc, block_tables[b].cpu(), S).repeat_interleave(rep, dim=0)
        v = gather_paged(vc, block_tables[b].cpu(), S).repeat_interleave(rep, dim=0)
        z = (q[t0:t1].transpose(0, 1) @ k.transpose(-2, -1)) * scale  # (Hq, L, S)
        pos = torch.arange(S - L, S).unsqueeze(1)
        z = z.masked_fill(torch.arange(S).unsqueeze(0) > pos, float("-inf"))
        out[t0:t1] = (torch.softmax(z, dim=-1) @ v).transpose(0, 1)
    return out


def dynamic_input(input, scheme):
    """The input a dynamic scheme's products see, in float64: each row ("int8_dynamic") or each block
    of 32 features of a row ("int4_dynamic") quantized as the op does (in float32: scale max|x| / 127,
    x * (127 / max|x|) rounded to nearest even), then times its scale."""
    x32 = input.detach().cpu().to(torch.float32)
    shape = x32.shape
    if scheme == "int4_dynamic":
        x32 = x32.reshape(*shape[:-1], shape[-1] // 32, 32)
    amax = x32.abs().amax(dim=-1, keepdim=True)
    # a true division, as the op's 127 / max|x| (a Python scalar over a tensor is a reciprocal and a
    # product, two roundings, which can move a value at a rounding tie)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round((x32 * inv).clamp(-127, 127)).to(torch.float64)
    return (xq * (amax / 127.0).to(torch.float64)).reshape(shape)


def quantized_linear(input, qweight, scale, bias=None, scheme="int8"):
    """input @ dequant(qweight).T + bias in float64, the weights unpacked here from the documented
    layout (fusedformer.ops.quantized_linear) rather than through the package's helpers (nf4's levels
    are the documented table, ``NF4_LEVELS``). For
    "int8_dynamic" the input rows are first quantized as the op does (scale max|x| / 127, round to
    nearest), for "int4_dynamic" each block of 32 features of a row; the product of the integers is
    then exact in float64."""
    x = _f64(input)
    s = scale.detach().cpu().to(torch.float64)
    if scheme in ("int4", "nf4", "int4_dynamic"):
        b = qweight.detach().cpu().to(torch.int64)
        N, half = b.shape
        c = torch.empty(N, 2 * half, dtype=torch.int64)  # the nibbles, codes 0 .. 15
        for blk in range(half // 16):
            chunk = b[:, 16 * blk:16 * blk + 16]
            c[:, 32 * blk:32 * blk + 16] = chunk & 15
            c[:, 32 * blk + 16:32 * blk + 32] = chunk >> 4
        if scheme != "nf4":
            levels = torch.arange(-8, 8, dtype=torch.float64)
        else:
            from .ops.quantized_linear import NF4_LEVELS
            levels = torch.tensor(NF4_LEVELS, dtype=torch.float32).to(torch.float64)
        w = levels[c] * s.repeat_interleave(c.shape[1] // s.shape[1], dim=1)
    else:
        w = qweight.detach().cpu().to(torch.float64) * s[:, None]
    if scheme in ("int8_dynamic", "int4_dynamic"):
        x = dynamic_input(input, scheme)
    y = x @ w.T
    if bias is not None:
        y = y + _f64(bias)
    return y

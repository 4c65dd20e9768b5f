"""Structured pruning of a fusedformer GPT: whole attention heads and feed-forward neurons removed
by an importance score, the projections shrunk (so the model is smaller and faster everywhere) and
the config updated. The config holds one head count and one feed-forward width for all layers, so
every layer loses the same number of heads and neurons: each its least important ones.

Importance ("magnitude"): a head's is the L2 norm of its q/k/v rows times that of its columns of the
output projection; a neuron's the norm of its up (and gate) rows times that of its down column.
Removing a head or a neuron is exactly zeroing its output-projection columns (see ``plan``)."""

from typing import Dict, List, Optional

import torch

from ..models.gpt import GPT

IMPORTANCE = ("magnitude",)


def _fraction(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise ValueError(f"prune: {name} must be a fraction in (0, 1), got {value!r}")
    return float(value)


def _keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores, in increasing order (the surviving rows keep their order)."""
    return scores.topk(n_keep).indices.sort().values


def _head_scores(attn) -> torch.Tensor:
    H, E = attn.n_head, attn.head_dim
    w = attn.qkv.weight.detach().double().view(3, H, E, -1)  # [q; k; v] rows, head by head
    o = attn.out.weight.detach().double().view(-1, H, E)
    return w.pow(2).sum((0, 2, 3)).sqrt() * o.pow(2).sum((0, 2)).sqrt()


def _neuron_scores(mlp, d_ff: int) -> torch.Tensor:
    up = mlp.up.weight.detach().double().view(-1, d_ff, mlp.up.in_features)  # (1 or 2 [gate; up], d_ff, D)
    down = mlp.down.weight.detach().double()
    return up.pow(2).sum((0, 2)).sqrt() * down.pow(2).sum(0).sqrt()


def plan(model, heads=None, ffn=None, importance: str = "magnitude") -> List[Dict[str, torch.Tensor]]:
    """Per layer, the kept head indices (``"heads"``) and feed-forward neuron indices (``"ffn"``), without
    changing the model. Raises TypeError for a model other than a fusedformer GPT and ValueError for
    a bad fraction or importance, a fraction that removes every head or neuron, or heads of a GQA model."""
    if not isinstance(model, GPT):
        raise TypeError(f"prune: structured pruning needs a fusedformer.models.GPT; got model of type "
                        f"{type(model).__module__}.{type(model).__qualname__}")
    if importance not in IMPORTANCE:
        raise ValueError(f"prune: importance must be one of {IMPORTANCE}, got {importance!r}")
    heads, ffn = _fraction("heads", heads), _fraction("ffn", ffn)
    if heads is None and ffn is None:
        raise ValueError("prune: structured pruning needs heads and/or ffn (fractions to remove)")
    c = model.config
    out = []
    n_head_keep = c.n_head - round(heads * c.n_head) if heads else c.n_head
    d_ff_keep = c.d_ff - round(ffn * c.d_ff) if ffn else c.d_ff
    if heads and c.n_kv_head != c.n_head:
        raise ValueError(f"prune: heads cannot be removed from a grouped-query model (n_head {c.n_head}, "
                         f"n_kv_head {c.n_kv_head}); prune ffn only")
    if n_head_keep < 1:
        raise ValueError(f"prune: heads={heads} removes all {c.n_head} heads of each layer")
    if d_ff_keep < 1:
        raise ValueError(f"prune: ffn={ffn} removes all {c.d_ff} feed-forward neurons of each layer")
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        raise ValueError("prune: the model has masked weights; call fusedformer.remove_masks(model) before "
                         "structured pruning")
    for blk in model.blocks:
        out.append({"heads": _keep(_head_scores(blk.attn), n_head_keep) if heads else torch.arange(c.n_head),
                    "ffn": _keep(_neuron_scores(blk.mlp, c.d_ff), d_ff_keep) if ffn else torch.arange(c.d_ff)})
    return out


def _rows(index: torch.Tensor, width: int) -> torch.Tensor:
    """The row indices of units ``index`` that are ``width`` rows each."""
    return (index[:, None] * width + torch.arange(width)).flatten()


def _sliced(old, rows=None, cols=None):
    """A new linear layer of ``old``'s class with the weight's ``rows`` / ``cols`` (and bias rows) kept."""
    w = old.weight.detach()
    b = old.bias.detach() if old.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = type(old)(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.weight.requires_grad_(old.weight.requires_grad)
    if b is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    if "fused" in old.__dict__:
        new.fused = old.fused
    new.train(old.training)
    return new


def shrink(model, kept: List[Dict[str, torch.Tensor]]) -> None:
    """Cut the projections of every layer to the kept heads and neurons of ``kept`` (from ``plan``) and
    record the new sizes in ``model.config``."""
    c = model.config
    n_head, d_ff = len(kept[0]["heads"]), len(kept[0]["ffn"])
    for blk, k in zip(model.blocks, kept):
        attn, mlp = blk.attn, blk.mlp
        if n_head != attn.n_head:
            H, E = attn.n_head, attn.head_dim
            cols = _rows(k["heads"], E)
            attn.qkv = _sliced(attn.qkv, rows=torch.cat([cols, H * E + cols, 2 * H * E + cols]))
            attn.out = _sliced(attn.out, cols=cols)
            attn.n_head = attn.n_kv_head = n_head
        if d_ff != c.d_ff:
            parts = mlp.up.out_features // c.d_ff  # 2 for SwiGLU's [gate; up]
            rows = torch.cat([p * c.d_ff + k["ffn"] for p in range(parts)])
            mlp.up = _sliced(mlp.up, rows=rows)
            mlp.down = _sliced(mlp.down, cols=k["ffn"])
    c.n_head = c.n_kv_head = n_head
    c.d_ff = d_ff


def zeroed(model, kept: List[Dict[str, torch.Tensor]]):
    """A copy of ``model`` unshrunk, with the output-projection columns of the heads and the down-projection
    columns of the neurons that ``kept`` leaves out set to zero: what the shrunk model computes (for
    validation)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for blk, k in zip(ref.blocks, kept):
            attn, mlp = blk.attn, blk.mlp
            heads = torch.ones(attn.n_head, dtype=torch.bool).index_fill_(0, k["heads"], False)
            attn.out.weight[:, heads.repeat_interleave(attn.head_dim)] = 0
            mlp.down.weight[:, torch.ones(mlp.down.in_features, dtype=torch.bool).index_fill_(0, k["ffn"], False)] = 0
    return ref

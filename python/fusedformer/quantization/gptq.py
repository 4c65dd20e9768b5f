"""Calibrated quantization (GPTQ, Frantar et al. 2022): a layer's weights rounded one input column at a
time, each rounding error spread over the columns not yet rounded, weighted by how the layer's inputs
co-vary, so that the layer's *outputs* on data like the calibration data move as little as the grid
allows, where round-to-nearest only keeps each weight close.

For a layer with inputs x (rows of X), H = E[x x^T] (:func:`input_hessians` collects it with forward
pre-hooks while the float model runs the calibration batches). With U the upper Cholesky factor of
(H + damping)^-1, column k is rounded to q_k and the not yet rounded columns j > k take
w_j -= (w_k - q_k) U_kj / U_kk: the least-squares correction of the output for that error. Scales are
those of the uncalibrated format: int8 per output channel from the whole row, int4 and nf4 per group
from the group's weights as they stand when rounding reaches it (after the corrections of earlier
groups), with the same least-squared-error search (:func:`fusedformer.ops.quantized_linear.quantize_weight`).
Inputs that the calibration never set (a zero diagonal entry) get the mean diagonal, so that their
weights are rounded to nearest and pass no error on.
"""

from typing import Dict, Iterable, Sequence, Tuple

import torch

from ..ops.quantized_linear import (GROUPED_SCHEMES, INT4_GROUP_SIZES, SCHEMES, _group_search, int8_scales,
                                    inverse_scale, level_values, nf4_table, pack_int4, round_to_levels)

# columns rounded between two updates of the rest of the matrix (the update is one product)
_BLOCK = 128


def _call(model: torch.nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def input_hessians(model: torch.nn.Module, names: Sequence[str], calibration: Iterable) -> Dict[str, torch.Tensor]:
    """{name: E[x x^T]} (float64, in_features square) over every input row x that the layers ``names``
    of ``model`` receive while it runs each batch of ``calibration`` (a tensor: ``model(batch)``; a
    dict: ``model(**batch)``; a tuple or list: ``model(*batch)``) under no_grad. Raises ValueError if
    ``calibration`` holds no batch or a layer is never called (a module that reads its weight itself)."""
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}
    rows = dict.fromkeys(names, 0)

    def hook(name):
        def pre(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(device="cpu", dtype=torch.float64)
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    batches = 0
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in calibration:
                _call(model, batch)
                batches += 1
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if batches == 0:
        raise ValueError("quantize: calibration holds no batch")
    missing = [n for n in names if rows[n] == 0]
    if missing:
        raise ValueError(f"quantize: layer {missing[0]!r} was not called on the calibration data (its owner may "
                         "read its weight directly); pass it in skip, or quantize without calibration")
    return {n: sums[n] / rows[n] for n in names}


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: str, group_size=None,
                  damping: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scale) of ``weight`` (N, K) in ``scheme``'s format, as
    :func:`~fusedformer.ops.quantized_linear.quantize_weight` gives them, rounded by GPTQ against the
    input second moments ``hessian`` (K, K); ``damping`` x the mean of its diagonal is added to the
    diagonal (a feature never seen on the calibration data gets the mean). With H the identity the
    result is round-to-nearest's, bit for bit."""
    w = weight.detach().to(device="cpu", dtype=torch.float32).clone()
    N, K = w.shape
    if hessian.shape != (K, K):
        raise ValueError(f"gptq_quantize: hessian must be ({K}, {K}) for a weight of {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if not damping > 0:
        raise ValueError(f"gptq_quantize: damping must be positive, got {damping}")
    h = hessian.detach().to(device="cpu", dtype=torch.float64).clone()
    diag = torch.diagonal(h)
    mean = diag.mean().item()
    diag[diag <= 0] = mean if mean > 0 else 1.0  # features the calibration never set
    diag.add_(damping * (mean if mean > 0 else 1.0))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    q = torch.empty(N, K, dtype=torch.int16)
    grouped = scheme in GROUPED_SCHEMES
    if grouped:
        if group_size not in INT4_GROUP_SIZES or K % group_size != 0:
            raise ValueError(f"gptq_quantize: group_size must be one of {INT4_GROUP_SIZES} dividing in_features "
                             f"({K}), got {group_size!r}")
        scale = torch.empty(N, K // group_size, dtype=torch.float32)
        inv = torch.empty_like(scale)
    elif scheme in SCHEMES:  # per-channel scales from the whole rows, as quantize_weight sets them
        scale, inv = int8_scales(w)
    else:
        raise ValueError(f"gptq_quantize: scheme must be one of {SCHEMES}, got {scheme!r}")
    table = nf4_table(w.device) if scheme == "nf4" else None  # made once for all the columns
    for b0 in range(0, K, _BLOCK):
        b1 = min(b0 + _BLOCK, K)
        wb, err, ub = w[:, b0:b1], torch.empty(N, b1 - b0), u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            k = b0 + i
            col = wb[:, i]
            if grouped:
                g = k // group_size
                if k % group_size == 0:  # the group's scale from its weights as they stand now
                    _, scale[:, g] = _group_search(wb[:, i:i + group_size].contiguous(), scheme)
                    inv[:, g] = inverse_scale(scale[:, g])
                qk = round_to_levels(col * inv[:, g], scheme, table)
                value = level_values(qk, scheme, table) * scale[:, g]
            else:
                qk = torch.round(col * inv).clamp_(-127, 127)
                value = qk * scale
            q[:, k] = qk.to(torch.int16)
            e = (col - value) / ub[i, i]
            wb[:, i + 1:] -= e[:, None] * ub[i, i + 1:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    if grouped:
        return pack_int4(q), scale
    return q.to(torch.int8).contiguous(), scale

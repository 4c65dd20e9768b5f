"""fusedformer.ops.linear_cross_entropy: ``F.cross_entropy(F.linear(input, weight, bias), target)``
without the logits.

A language model's head and loss are a ``(tokens, vocab)`` logits matrix, its log-softmax and the
gradient of both, each as large as the logits (64 MB for 4096 tokens of a 4096-word vocabulary,
800 MB for GPT-2's 50257 words). Here the rows go in chunks whose logits stay under
``MAX_BLOCK_BYTES`` (see fusedformer.ops._blocks): for each chunk the head's product, the row
log-sum-exp and the loss, then, in the same buffer, the gradient of the logits (``softmax -
one_hot``, scaled), which is multiplied straight into the gradients of ``input``, ``weight`` and
``bias``. The forward therefore also computes the gradients (when they are needed) and the
backward only scales them by the incoming gradient: no logits-sized tensor lives beyond one
chunk, and no large buffer is allocated afresh on every call (the page faults of a fresh 64 MB
buffer cost about as much as the pass that fills it).
"""

from typing import Optional

import torch
from torch import Tensor

from ._blocks import row_blocks
from ._checks import check_same_device, check_tensor
from .linear import linear

_ops = torch.ops.fusedformer


def _check(input, weight, bias, target, ignore_index, reduction):
    name = "fusedformer.linear_cross_entropy"
    check_tensor(name, "input", input)
    check_tensor(name, "weight", weight)
    check_tensor(name, "target", target)
    if bias is not None:
        check_tensor(name, "bias", bias)
    check_same_device(name, "input", input, weight=weight, bias=bias, target=target)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{name}: reduction must be 'mean' or 'sum', got {reduction!r} (per-token losses need the "
                         "logits: use F.cross_entropy(..., reduction='none'))")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if input.dim() < 1 or not input.is_floating_point():
        raise ValueError(f"{name}: input must be a floating-point tensor (..., in_features), got {input.dtype} of "
                         f"shape {tuple(input.shape)}")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{name}: weight must be (vocab, in_features) = (V, {input.shape[-1]}), got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise ValueError(f"{name}: weight and bias must have input's dtype {input.dtype}, got weight {weight.dtype}"
                         + (f", bias {bias.dtype}" if bias is not None else ""))
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias must be (vocab,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"{name}: target must be int64 class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{name}: target must have input's leading shape {tuple(input.shape[:-1])}, got "
                         f"{tuple(target.shape)}")


def _run(input, weight, bias, target, ignore_index, reduction, need_x, need_w, need_b):
    """The loss and, for the arguments asked for, its gradients (input's shape, weight's, bias's dtype)."""
    D, V = input.shape[-1], weight.shape[0]
    x = input.reshape(-1, D)
    t = target.reshape(-1)
    # float32 accumulation (float64 computes in double)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # mean over the rows that are not ignored (NaN when there is none, as F.cross_entropy)
    if reduction == "mean":
        scale = 1.0 / (t != ignore_index).sum().to(acc)
    else:
        scale = torch.ones((), dtype=acc, device=x.device)
    grads = need_x or need_w or need_b
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.zeros(V, D, dtype=acc, device=x.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=x.device) if need_b else None
    loss = torch.zeros((), dtype=acc, device=x.device)
    # rows per chunk: the chunk's logits, counted at 4 bytes each, stay under MAX_BLOCK_BYTES
    step = row_blocks(x.shape[0], V, torch.float32)
    for r in range(0, x.shape[0], step):
        xc = x[r : r + step]
        # per row: lse - the target's logit and, with grads, d loss / d logits = (softmax - one_hot) *
        # scale (0 on ignored rows) in the logits' dtype; out-of-range targets raise there
        rows, p = _ops.cross_entropy_rows(linear(xc, weight, bias), t[r : r + step], scale, ignore_index, grads)
        loss += rows.sum()
        if need_x:
            if p.dtype == x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type):
                torch.mm(p, weight, out=grad_x[r : r + step])
            else:  # autocast: the head ran in its lower precision, and so does this product
                grad_x[r : r + step] = torch.mm(p, weight.to(p.dtype))
        if need_w:
            grad_w.addmm_(p.t().to(acc), xc.to(acc))
        if need_b:
            grad_b += p.sum(0, dtype=acc)
    return (
        (loss * scale).to(input.dtype),
        grad_x.view(input.shape) if need_x else None,
        grad_w.to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, target, ignore_index, reduction):
        need = ctx.needs_input_grad
        loss, gx, gw, gb = _run(input, weight, bias, target, ignore_index, reduction, need[0], need[1],
                                bias is not None and need[2])
        ctx.save_for_backward(gx, gw, gb)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return scaled[0], scaled[1], scaled[2], None, None, None


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias).flatten(0, -2), target.flatten(), ignore_index=...,
    reduction=...)`` for ``input`` (..., in_features), ``weight`` (vocab, in_features), ``target``
    (...) int64 class indices, computed in row chunks without the logits (see the module docstring).

    ``reduction`` is ``"mean"`` (over the rows whose target is not ``ignore_index``; NaN if all are)
    or ``"sum"``. The loss is accumulated in float32 and returned in ``input``'s dtype.
    Differentiable in ``input``, ``weight`` and ``bias``; their gradients are computed by the
    forward when autograd needs them, so a forward under ``torch.no_grad()`` costs only the
    product and the log-sum-exp. A second derivative is not supported.
    """
    _check(input, weight, bias, target, ignore_index, reduction)
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (input, weight, bias)):
        return _LinearCrossEntropy.apply(input, weight, bias, target, ignore_index, reduction)
    return _run(input, weight, bias, target, ignore_index, reduction, False, False, False)[0]


@torch.library.register_fake("fusedformer::cross_entropy_rows")
def _cross_entropy_rows_fake(logits, target, scale, ignore_index, compute_grad):
    check_same_device("fusedformer.cross_entropy_rows", "logits", logits, target=target, scale=scale)
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"fusedformer.cross_entropy_rows: logits (rows, classes) and target (rows,) expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return logits.new_empty(logits.shape[:1], dtype=acc), grad

"""Knowledge distillation: a smaller GPT (the student) learns from a trained one's (the teacher's)
next-token distributions as well as from the data. The loss of a batch is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross_entropy(student, data)

with temperature T (softer targets carry more of the teacher's ranking of the wrong tokens; T^2 keeps
the gradient's scale independent of T). ``python -m fusedformer distill`` runs it through the training
loop of ``train`` (same corpus, progress bar, checkpoints, loss curve and held-out perplexity), with
the teacher's tokenizer."""

import os
from typing import Tuple

import torch
import torch.nn.functional as F

from .errors import UserError


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float) -> torch.Tensor:
    """The mixed loss above, averaged over the tokens: logits (..., V), targets (...)."""
    if not temperature > 0:
        raise ValueError(f"distill_loss: temperature must be positive, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"distill_loss: alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distill_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (the teacher's vocabulary must be the student's)")
    s = student_logits.flatten(0, -2).float()
    loss = 0.0
    if alpha > 0:
        t = teacher_logits.flatten(0, -2).float()
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                      reduction="batchmean")
        loss = alpha * temperature * temperature * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, targets.flatten())
    return loss


def load_teacher(path: str, device=None) -> Tuple[torch.nn.Module, object]:
    """(model in eval mode, frozen, float32, on ``device``; its tokenizer) of a fusedformer checkpoint
    folder (what ``train`` or ``distill`` writes, or the shipped model's folder)."""
    from .textgen import load_model

    if not os.path.isdir(path):
        raise UserError(f"--teacher {path} is not a folder")
    try:
        model, tok = load_model(path, dtype="float32")
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise UserError(f"--teacher {path}: not a fusedformer GPT checkpoint with its tokenizer ({e})") from None
    model = model.eval().requires_grad_(False)
    return (model.to(device) if device is not None else model), tok


class DistillLoss(torch.nn.Module):
    """The training loop's loss module for distillation: ``forward(x, y)`` runs the student (a module,
    so that DistributedDataParallel sees the call) and the frozen teacher (kept out of the module's
    parameters)."""

    def __init__(self, student, teacher, temperature: float, alpha: float):
        super().__init__()
        self.model = student
        self._teacher = (teacher,)  # a tuple: not a submodule, so not trained, synchronized or saved
        self.temperature, self.alpha = temperature, alpha

    def forward(self, x, y):
        with torch.no_grad():
            teacher_logits = self._teacher[0](x)
        return distill_loss(self.model(x), teacher_logits, y, self.temperature, self.alpha)

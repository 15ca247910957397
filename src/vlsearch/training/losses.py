"""Contrastive and distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, text) rows.

    same [B,B] bool marks off-diagonal pairs that are also positives (two captions of one image); they are
    removed from the denominators rather than pushed apart.
    """
    logits = scale * image @ text.t()
    if same is not None:
        off = same & ~torch.eye(len(image), dtype=torch.bool)
        logits = logits.masked_fill(off, float("-inf"))
    target = torch.arange(len(image))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) of row-softmaxed score matrices, in both directions (Miech et al.'s distillation).

    Zero exactly when student and teacher rank every row with the same distribution.
    """
    loss = 0.0
    for s, t in ((student_logits, teacher_logits), (student_logits.t(), teacher_logits.t())):
        log_p_s = F.log_softmax(s / temperature, dim=-1)
        log_p_t = F.log_softmax(t / temperature, dim=-1)
        loss = loss + F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return 0.5 * loss * temperature**2

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


def candidate_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) between per-row softmaxes over the same candidates (rows = queries), as in
    Miech et al.'s distillation; zero exactly when both rank every row with the same distribution."""
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2

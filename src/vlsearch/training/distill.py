"""Distilling the Fast model from a Slow teacher (Miech et al. 2021, Sec. 3.3): the teacher's scores over
fixed Fast candidates, cached on disk, and the extra loss term ``train_fast`` adds with them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlsearch.config import read_npz, write_npz
from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.models.fast import set_hubness
from vlsearch.models.registry import fingerprint, load_model
from vlsearch.precision import autocast
from vlsearch.search.pair_scoring import score_pairs_grouped
from vlsearch.settings import home
from vlsearch.training import fast as fast_training
from vlsearch.training.common import TrainRequest, load_split
from vlsearch.training.crossfit import fold_priors
from vlsearch.training.losses import candidate_kl
from vlsearch.training.mining import cached_fast_candidates, features_fingerprint


@dataclass
class DistillConfig:
    k: int = 7  # candidates per train caption: its image + the Fast top-k wrong images
    # "fused" (fast + w * slow, in the Fast logit scale), "slow" (the Slow score), or "auto": "slow" for a
    # Slow model with a Fast prior (its score already is prior_scale x Fast cosine + what cross-attention
    # adds), "fused" otherwise
    target: str = "auto"
    captions_per_step: int = 96  # batch captions that get the KL term (all get InfoNCE)
    captions_per_image: int = 1  # train captions with teacher scores (fixed, seeded); others: InfoNCE only
    weight: float = 1.0
    temperature: float = 1.0


class SlowTeacher:
    """Precomputed teacher logits over fixed candidates; ``loss`` is the train_fast hook.

    The student's scores over the same candidates use its image tower on the un-augmented grids; the
    tower's parameter-free inputs (the pooled grid and the frozen concept vector,
    ``FastModel.image_inputs``) are computed once, and only its trained part runs per step."""

    def __init__(
        self, candidates: torch.Tensor, logits: torch.Tensor, captions_per_step: int = 128, seed: int = 0
    ):
        self.candidates, self.logits = candidates.long(), logits.float()
        self.captions_per_step = captions_per_step
        self.gen = torch.Generator().manual_seed(seed)
        self._inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _image_emb(self, model, train, rows: torch.Tensor) -> torch.Tensor:
        if not hasattr(model, "image_inputs"):
            return model.encode_image(train.grid[rows])
        if self._inputs is None or len(self._inputs[0]) != len(train.grid):
            with torch.no_grad():
                parts = [model.image_inputs(train.grid[s : s + 512]) for s in range(0, len(train.grid), 512)]
            pooled = torch.cat([p for p, _ in parts])
            concept = torch.cat([c for _, c in parts]) if parts[0][1] is not None else None
            self._inputs = (pooled, concept)
        pooled, concept = self._inputs
        return model.image_from_inputs(pooled[rows], None if concept is None else concept[rows])

    def loss(self, model, train, imgs, caps, image_emb, text_emb, temperature) -> torch.Tensor:
        rows = torch.nonzero(self.candidates[caps, 0] >= 0).flatten()  # captions the teacher scored
        if len(rows) == 0:
            return text_emb.sum() * 0.0
        if self.captions_per_step and len(rows) > self.captions_per_step:
            rows = rows[torch.randperm(len(rows), generator=self.gen)[: self.captions_per_step]]
        cand = self.candidates[caps[rows]]  # [B, C]
        uniq, inv = torch.unique(cand, return_inverse=True)
        with autocast():
            emb = self._image_emb(model, train, uniq)
        emb = emb.float()[inv]  # [B, C, D]
        student = model.scale * (text_emb[rows][:, None, :] * emb).sum(-1)
        return candidate_kl(student, self.logits[caps[rows]], temperature)


def teacher_logits(slow_name, train: DatasetFeatures, dc: DistillConfig, fast_name="fast", progress=True):
    """Candidates [M, 1+k] (each train caption's image first, then the Fast top-k wrong images) and their
    Slow scores, cached under $VLSEARCH_HOME/distill keyed by the Slow and Fast fingerprints. Returns
    (candidates, slow_scores, fast_cosines, fast_scale).

    A Slow model trained on out-of-fold priors (training/crossfit.py) scores train out of fold too: each
    caption's candidates are its fold's hard negatives under the fold's Fast model, scored with that model
    as the prior. With the full Fast model as its prior, the teacher would mostly repeat Fast's memorised
    train scores."""
    slow, slow_meta, slow_path = load_model(slow_name)
    fast, fast_meta, fast_path = load_model(fast_name)
    set_hubness(fast, False)  # the candidates and scores of the measured recipe (docs/slow.md)
    oof = slow_meta.get("out_of_fold_priors") if getattr(slow, "prior", None) is not None else None
    key = (
        f"{fingerprint(slow_path)}-{fingerprint(fast_path)}-{features_fingerprint(train)}"
        f"-k{dc.k}-c{dc.captions_per_image}{'-oof' if oof else ''}"
    )
    cache = home() / "distill" / f"{key}.npz"
    z = read_npz(cache)
    if z is not None:
        return z["candidates"], z["slow"], z["fast"], float(z["scale"])
    mined = cached_fast_candidates(fast_name, train, max(dc.k, 31), progress)
    priors = None
    if oof:
        seed = slow_meta.get("train", {}).get("seed", 0)
        priors = fold_priors(
            train, fast, fast_meta.get("train", {}), oof["folds"], max(dc.k, 31), seed, progress
        )
    ci = train.caption_image.numpy()
    negatives = mined["neg_img"] if priors is None else priors.neg_img
    cand = np.concatenate([ci[:, None], negatives[:, : dc.k]], axis=1)
    M = len(cand)
    # a fixed, seeded subset of each image's captions gets teacher scores; the others are marked -1
    rng = np.random.default_rng(0)
    keep = np.zeros(M, dtype=bool)
    by_image = np.argsort(ci, kind="stable")
    for caps in np.split(by_image, np.flatnonzero(np.diff(ci[by_image])) + 1):
        keep[rng.permutation(caps)[: dc.captions_per_image]] = True
    slow_scores = np.zeros(cand.shape, dtype=np.float32)
    caption_fold = np.zeros(M, np.int64) if priors is None else priors.fold_of_image[ci]
    for fold in np.unique(caption_fold):
        rows = np.flatnonzero(keep & (caption_fold == fold))
        swap = slow.prior_swapped(priors.models[fold]) if priors is not None else contextlib.nullcontext()
        with swap:
            slow_scores[rows] = score_pairs_grouped(
                slow,
                train.states,
                train.lengths,
                train.grid,
                train.mid,
                np.repeat(rows, cand.shape[1]),
                cand[rows].ravel(),
                progress,
                "distill: slow teacher scores",
            ).reshape(len(rows), cand.shape[1])
    cand[~keep] = -1
    fast_cos = np.einsum("md,mkd->mk", mined["text_emb"], mined["image_emb"][np.maximum(cand, 0)])
    write_npz(
        cache,
        candidates=cand,
        slow=slow_scores,
        fast=fast_cos.astype(np.float32),
        scale=np.float32(mined["scale"]),
    )
    return cand, slow_scores, fast_cos, float(mined["scale"])


def distillation_teacher(name, req: TrainRequest):
    """(teacher, FastTrainConfig overrides) for `vlsearch train fast --distill NAME`."""
    dc = DistillConfig()
    train = load_split(req, "train", mid=True)
    slow, meta, _ = load_model(name)
    fast_name = meta.get("fast_model", "fast")
    cand, slow_scores, fast_cos, scale = teacher_logits(name, train, dc, fast_name, progress=req.progress)
    target = dc.target
    if target == "auto":
        target = "slow" if getattr(slow, "prior", None) is not None else "fused"
    if target == "fused":
        logits = scale * (fast_cos + slow.config.fusion_weight * slow_scores)
    else:
        logits = slow_scores
    teacher = SlowTeacher(
        torch.from_numpy(cand), torch.from_numpy(np.asarray(logits)), dc.captions_per_step, req.seed
    )
    weight, temperature = req.distill_weight, req.distill_temperature
    settings = {
        "distill_weight": dc.weight if weight is None else weight,
        "distill_temperature": dc.temperature if temperature is None else temperature,
        "distill_teacher": str(name),
    }
    return teacher, settings


def train_distilled_and_save(req: TrainRequest) -> Path:
    """`vlsearch train fast --distill SLOW`: the same recipe plus KL to the Slow model's in-batch scores."""
    teacher, settings = distillation_teacher(req.distill or "slow", req)
    return fast_training.train_and_save(req, teacher=teacher, extra=settings)

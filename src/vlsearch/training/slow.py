"""Training the Slow model on Fast-mined hard negatives, choosing the fusion weight on dev, and the Slow
teacher for distilling the Fast model (Miech et al. 2021, Sec. 3.2-3.3).

Objective: listwise softmax in both directions over *groups* of confusable images. A group is a seed image,
``group_hard`` of the images the Fast model ranks highest (wrongly) for one of the seed's captions, and a
few random images; every caption of every group image is scored against every group image (one
``score_block``: image keys/values computed once, shared by ~80 captions). Text-to-image: each caption's
image among the group's images (what re-ranking sorts); image-to-text: each of an image's captions among
the group's captions of other images (the other captions of the same image are left out).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.errors import CheckpointError
from vlsearch.eval.metrics import i2t_ranks, recalls, retrieval_metrics, t2i_ranks
from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.models.embed import embed_features
from vlsearch.models.registry import load_model
from vlsearch.models.slow import SlowConfig, SlowModel
from vlsearch.precision import autocast
from vlsearch.search.fusion import fused_matrices
from vlsearch.search.pair_scoring import rerank_candidates
from vlsearch.settings import checkpoint_out
from vlsearch.training.common import (
    TrainRequest,
    apply_overrides,
    captions_of_images,
    hflip,
    load_dev,
    load_split,
    optimizer_step,
    warmup_cosine,
)
from vlsearch.training.crossfit import FoldPriors, fold_priors, out_of_fold_metrics
from vlsearch.training.distill import (  # noqa: F401 - moved to training/distill.py, still importable here
    DistillConfig,
    SlowTeacher,
    distillation_teacher,
    teacher_logits,
)
from vlsearch.training.mining import cached_fast_candidates


@dataclass
class SlowTrainConfig:
    minutes: float = 30.0  # wall-clock budget for the optimisation (the cosine schedule follows it)
    max_epochs: float = 30.0  # cap in passes over the train images as group seeds
    group_size: int = 16
    group_hard: int = 12  # images from the seed caption's Fast hard negatives; the rest are random
    groups_per_step: int = 2
    mine_k: int = 31  # hard negatives are drawn from each caption's Fast top-mine_k wrong images
    lr: float = 5e-4  # fresh parameters (image projections, cross-attention, head)
    pretrained_lr: float = 1e-4  # MiniLM-initialised self-attention and feed-forward
    weight_decay: float = 0.01
    warmup_steps: int = 20
    bucket: int = 40  # captions per length bucket within a group
    i2t_weight: float = 1.0
    flip: bool = True  # random horizontal flip of both feature maps
    feature_dropout: float = 0.0  # element dropout on both feature maps (against memorising train)
    fusion_k: int = 20  # the re-ranking depth the fusion weights are chosen for, on dev
    seed: int = 0
    # With a Fast prior: train on out-of-fold priors (training/crossfit.py), one Fast model per fold trained
    # on the other folds; 0 trains on the full Fast model's own (over-confident, in-sample) train scores.
    prior_folds: int = 2


def group_loss(scores: torch.Tensor, cap_img: torch.Tensor, i2t_weight: float = 1.0) -> torch.Tensor:
    """scores [T, G]: T captions x G group images; cap_img [T] each caption's image (0..G-1).

    Text-to-image softmax over the G images plus image-to-text softmax, for every caption as its image's
    positive, over the captions of the other images."""
    t2i = F.cross_entropy(scores, cap_img)
    if i2t_weight <= 0:
        return t2i
    cols = scores[:, cap_img].t()  # [T, T]: row t = every caption's score with t's image
    same = cap_img[None, :] == cap_img[:, None]
    other_pos = same & ~torch.eye(len(cap_img), dtype=torch.bool)
    i2t = F.cross_entropy(cols.masked_fill(other_pos, float("-inf")), torch.arange(len(cap_img)))
    return t2i + i2t_weight * i2t


class GroupSampler:
    """Groups of confusable images: a seed, Fast hard negatives of one of its captions, random fill."""

    def __init__(
        self, feats: DatasetFeatures, neg_img: np.ndarray, tc: SlowTrainConfig, rng, fold_of_image=None
    ):
        self.caption_image = feats.caption_image.numpy()
        self.captions_of = captions_of_images(self.caption_image, feats.n_images)
        self.pool = np.flatnonzero([len(c) > 0 for c in self.captions_of])
        # with folds, a group stays inside its seed's fold (random fill too): one prior scores all of it
        self.fold_of = (
            np.zeros(feats.n_images, np.int64) if fold_of_image is None else np.asarray(fold_of_image)
        )
        self.fold_pools = [
            self.pool[self.fold_of[self.pool] == f] for f in range(int(self.fold_of.max()) + 1)
        ]
        self.neg_img = neg_img[:, : tc.mine_k]
        self.tc, self.rng = tc, rng
        self.size = min(tc.group_size, len(self.pool))
        self._order, self._pos, self.epoch = self.rng.permutation(self.pool), 0, 0

    def next_seed(self) -> int:
        if self._pos >= len(self._order):
            self._order, self._pos = self.rng.permutation(self.pool), 0
            self.epoch += 1
        self._pos += 1
        return int(self._order[self._pos - 1])

    @property
    def epochs_done(self) -> float:
        return self.epoch + self._pos / max(1, len(self._order))

    def group(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(images [G], captions [T], caption's image position in the group [T], the group's fold)."""
        seed = self.next_seed()
        fold = int(self.fold_of[seed])
        pool = self.fold_pools[fold]
        caps = self.captions_of[seed]
        c = caps[self.rng.integers(len(caps))]
        hard = [int(i) for i in self.neg_img[c] if self.captions_of[i]]
        n_hard = min(self.tc.group_hard, len(hard), self.size - 1, len(pool) - 1)
        chosen = [seed] + list(self.rng.choice(hard, size=n_hard, replace=False)) if n_hard else [seed]
        taken = set(chosen)
        while len(chosen) < min(self.size, len(pool)):
            i = int(pool[self.rng.integers(len(pool))])
            if i not in taken:
                chosen.append(i)
                taken.add(i)
        images = np.array(chosen)
        captions = np.array([c for i in images for c in self.captions_of[i]])
        where = {int(i): n for n, i in enumerate(images)}
        return images, captions, np.array([where[int(self.caption_image[c])] for c in captions]), fold


def train_slow(
    train: DatasetFeatures,
    neg_img: np.ndarray,
    config: SlowConfig = SlowConfig(),
    tc: SlowTrainConfig = SlowTrainConfig(),
    progress: bool = True,
    log=print,
    init_from_pretrained: bool = True,
    max_steps: int | None = None,
    init: SlowModel | None = None,
    priors: FoldPriors | None = None,
) -> tuple[SlowModel, dict]:
    """Train on ``train`` (DatasetFeatures with mid) with Fast hard negatives ``neg_img`` [M, >=1];
    ``init`` warm-starts from a trained model (a new warm-up + cosine schedule over this budget);
    ``priors``: each group is scored with its fold's out-of-fold Fast model as the prior."""
    if train.mid is None:
        raise ValueError("the Slow model trains on the 14x14 mid map: DatasetFeatures.load(..., mid=True)")
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    model = init.train() if init is not None else SlowModel(config, init_from_pretrained=init_from_pretrained)
    config = model.config
    fresh, pretrained = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the frozen Fast prior
            continue
        is_pretrained = name.startswith("layers.") and ".cross_attn." not in name
        (pretrained if is_pretrained else fresh).append(p)
    opt = torch.optim.AdamW(
        [{"params": fresh, "lr": tc.lr}, {"params": pretrained, "lr": tc.pretrained_lr}],
        weight_decay=tc.weight_decay,
    )
    base = [tc.lr, tc.pretrained_lr]
    sampler = GroupSampler(train, neg_img, tc, rng, None if priors is None else priors.fold_of_image)
    budget = tc.minutes * 60.0
    history: dict = {"loss": [], "steps": 0}
    bar = tqdm(
        total=int(budget), desc="train slow (s)", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    t0 = time.time()
    step, ema = 0, None
    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or sampler.epochs_done >= tc.max_epochs or (max_steps and step >= max_steps):
            break
        frac = elapsed / budget if not max_steps else step / max_steps
        factor = warmup_cosine(step, tc.warmup_steps, frac)
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * factor
        loss = 0.0
        for _ in range(tc.groups_per_step):
            images, captions, cap_img, fold = sampler.group()
            imgs = torch.from_numpy(images)
            mid = train.mid[imgs]
            grid = train.grid[imgs] if config.use_grid else None
            if tc.flip and rng.random() < 0.5:
                mid, grid = hflip(mid), hflip(grid)
            if tc.feature_dropout > 0:
                mid = F.dropout(mid, tc.feature_dropout)
                grid = None if grid is None else F.dropout(grid, tc.feature_dropout)
            # captions sorted by length and scored in buckets: each bucket pads only to its own longest
            order = np.argsort(train.lengths[torch.from_numpy(captions)].numpy(), kind="stable")
            captions, cap_img = captions[order], cap_img[order]
            swap = (
                model.prior_swapped(priors.models[fold]) if priors is not None else contextlib.nullcontext()
            )
            with autocast(), swap:
                kv = model.image_kv(grid, mid)
                parts = []
                for b0 in range(0, len(captions), tc.bucket):
                    caps = torch.from_numpy(captions[b0 : b0 + tc.bucket])
                    lengths = train.lengths[caps]
                    text = model.text_state(train.states[caps, : int(lengths.max())], lengths)
                    parts.append(model.score_block(text, kv))
                scores = torch.cat(parts)
            loss = loss + group_loss(scores.float(), torch.from_numpy(cap_img), tc.i2t_weight)
        loss = loss / tc.groups_per_step
        optimizer_step(model, opt, loss)
        step += 1
        value = float(loss.detach())
        history["loss"].append(value)
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.n = min(int(time.time() - t0), int(budget))
        bar.set_postfix(step=step, loss=f"{ema:.3f}", ep=f"{sampler.epochs_done:.2f}")
        if step % 100 == 0 and not progress:
            log(f"step {step}: loss {ema:.3f}, {sampler.epochs_done:.2f} epochs, {time.time() - t0:.0f}s")
    bar.close()
    history.update({"steps": step, "epochs": sampler.epochs_done, "train_seconds": time.time() - t0})
    return model.eval(), history


# -- fusion with the Fast score ---------------------------------------------------------------------------
FUSION_GRID = [0.0, *np.geomspace(1e-3, 1.0, 31).tolist()]


def choose_fusion_weights(
    model: SlowModel, dev: DatasetFeatures, fast_name="fast", K: int = 20, progress=True
):
    """Pick w (fused = fast cosine + w * slow) per direction on dev at re-ranking depth K, maximising that
    direction's R@1+R@5+R@10. Returns (w_t2i, w_i2t, report)."""
    fast, _, _ = load_model(fast_name)
    img, txt = embed_features(fast, dev)
    sim = txt @ img.T
    ci = dev.caption_image.numpy()
    cands = rerank_candidates(model, dev, sim, K, progress)
    best = {"t2i": (-1.0, 0.0), "i2t": (-1.0, 0.0)}
    curve = []
    for w in [*FUSION_GRID, 1e6]:  # 1e6 ~ the Slow score alone within the top-K
        s_t2i, s_i2t = fused_matrices(sim, *cands[:4], w, w)
        r_t2i, r_i2t = recalls(t2i_ranks(s_t2i, ci)), recalls(i2t_ranks(s_i2t, ci))
        curve.append({"w": w, "t2i": r_t2i, "i2t": r_i2t})
        for d, r in (("t2i", r_t2i), ("i2t", r_i2t)):
            if w < 1e6 and sum(r.values()) > best[d][0] + 1e-9:
                best[d] = (sum(r.values()), w)
    w_t2i, w_i2t = best["t2i"][1], best["i2t"][1]
    s_t2i, s_i2t = fused_matrices(sim, *cands[:4], w_t2i, w_i2t)
    fused = retrieval_metrics(s_t2i, ci, s_i2t)
    report = {
        "K": K,
        "fast": retrieval_metrics(sim, ci),
        "fused": fused,
        "slow_only_in_top_k": curve[-1],
        "curve": curve,
    }
    return w_t2i, w_i2t, report


def train_and_save(req: TrainRequest) -> Path:
    """`vlsearch train slow`: mine Fast hard negatives on Flickr8k train, train (default 30 min), choose
    the fusion weights on dev, save the named model `slow`."""
    tc = apply_overrides(SlowTrainConfig(seed=req.seed), req, epochs_field="max_epochs")
    progress, log = req.progress, req.log
    train = load_split(req, "train", mid=True)
    fast_name = req.fast_model or "fast"
    config, init, previous, priors, fast = SlowConfig(), None, None, None, None
    if req.init:  # warm start: `vlsearch train slow --init CHECKPOINT`
        init, previous, init_path = load_model(req.init)
        if not isinstance(init, SlowModel):
            raise CheckpointError(
                f"--init {req.init}: a {init.model_type!r} model, not a Slow model: give a Slow checkpoint"
            )
        config = init.config
    elif req.fast_prior:  # opt-in: start from the Fast model's ranking (session 11: re-ranks worse)
        fast, fast_meta, _ = load_model(fast_name)
        config = SlowConfig(fast_prior=asdict(fast.config))
        init = SlowModel(config)
        init.set_prior(fast)
    if config.fast_prior is not None and tc.prior_folds >= 2:
        if fast is None:  # a warm start with a prior: the Fast model is not loaded yet
            fast, fast_meta, _ = load_model(fast_name)
        priors = fold_priors(
            train, fast, fast_meta.get("train", {}), tc.prior_folds, tc.mine_k, tc.seed, progress, log
        )
        oof = out_of_fold_metrics(priors, train)
        log(
            "out-of-fold priors, t2i R@1 on their held-out folds: "
            + ", ".join(f"{m['t2i']['r1']:.1f}" for m in oof)
        )
        neg_img = priors.neg_img
    else:
        neg_img = cached_fast_candidates(fast_name, train, tc.mine_k, progress)["neg_img"]
    model, history = train_slow(
        train, neg_img, config, tc, progress=progress, log=log, init=init, priors=priors
    )
    log(
        f"trained {history['steps']} steps ({history['epochs']:.2f} epochs) in {history['train_seconds'] / 60:.1f} min"
    )
    del train
    meta = {
        "train": asdict(tc),
        "data_root": str(req.data_root or "default"),
        "history": {k: v for k, v in history.items() if k != "loss"},
    }
    if previous is not None:
        meta["warm_start"] = {
            "from": str(init_path),
            "train": previous.get("train"),
            "history": previous.get("history"),
            "warm_start": previous.get("warm_start"),  # a chain of warm starts stays on record
        }
    meta["loss_last"] = float(np.mean(history["loss"][-50:])) if history["loss"] else None
    meta["fast_model"] = str(fast_name)
    if priors is not None:
        meta["out_of_fold_priors"] = {"folds": tc.prior_folds, "held_out_fold_recall": oof}
    out = checkpoint_out(req.out, "slow")
    # saved before the dev step with a neutral fusion weight: a long run is never lost to what follows
    model.config.fusion_weight = model.config.fusion_weight_i2t = 0.02
    saved = save_checkpoint(out, model, meta)
    dev = load_dev(req, mid=True)  # None: no dev split, the neutral fusion weight stays (said on stderr)
    if dev is not None and len(dev.states):
        w_t2i, w_i2t, report = choose_fusion_weights(model, dev, fast_name, tc.fusion_k, progress)
        model.config.fusion_weight, model.config.fusion_weight_i2t = w_t2i, w_i2t
        meta["fusion_dev"] = {k: v for k, v in report.items() if k != "curve"}
        meta["fusion_curve"] = report["curve"]
        f = report["fused"]
        log(
            f"dev, Fast top-{tc.fusion_k} re-ranked: w_t2i {w_t2i:.4f} w_i2t {w_i2t:.4f}; "
            f"t2i R@1 {report['fast']['t2i']['r1']:.1f} -> {f['t2i']['r1']:.1f}, "
            f"i2t R@1 {report['fast']['i2t']['r1']:.1f} -> {f['i2t']['r1']:.1f}"
        )
        saved = save_checkpoint(out, model, meta)  # again, with the fusion weights chosen on dev
    return saved

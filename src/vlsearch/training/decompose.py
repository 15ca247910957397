"""VLDeformer's second stage (Zhang et al. 2021): the trained joint checkpoint, switched to
``mode="decomposed"``, fine-tuned on a small target subset of train with the bi-modal hard-negative
contrastive loss (see training/deformer.py for both stages and the helpers they share)."""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.errors import CheckpointError, VLSearchError
from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.models.deformer import DeformerModel
from vlsearch.models.registry import load_model
from vlsearch.precision import autocast
from vlsearch.settings import checkpoint_out
from vlsearch.training.common import (
    TrainRequest,
    apply_overrides,
    captions_of_images,
    load_dev,
    load_split,
    optimizer_step,
    select_images,
    warmup_cosine,
)
from vlsearch.training.deformer import (
    FROM_FAST,
    _fmt,
    _image_inputs,
    _optimizer,
    _progress,
    _set_lr,
    decomposed_metrics,
    embed_decomposed,
)


@dataclass
class DecomposeTrainConfig:
    subset: float = 0.2  # fraction of the train images (with their captions) used to fine-tune
    epochs: int = 30
    minutes: float = 10.0
    batch_size: int = 128
    group: int = 4  # images per group of mutually confusable images in a batch
    intra_weight: float = 1.0  # weight of the same-modality (bi-modal) negatives in the denominators
    # + distill_weight * KL(joint || decomposed) over each of ``distill_queries`` captions' lists of
    # ``distill_list`` images (its own and the most confusable ones): the decomposition learns to rank
    # like the joint model it came from. 0 = the paper's contrastive-only decomposition. On dev, with the
    # term, fine-tuning lost less (last epoch at 20 %: 47.93 mean recall against 47.49 without; the two
    # runs decomposed different joint models, see docs/deformer.md).
    distill_weight: float = 1.0
    distill_queries: int = 16
    distill_list: int = 8
    distill_temperature: float = 1.0
    lr: float = 2e-4
    layer_lr: float = 2e-5
    weight_decay: float = 0.05
    warmup_steps: int = 20
    flip: bool = True
    feature_dropout: float = 0.1
    seed: int = 0
    bf16: bool = True


# -- stage 2: decomposition ------------------------------------------------------------------------------
def subset_features(feats: DatasetFeatures, fraction: float, seed: int = 0) -> DatasetFeatures:
    """A seeded random ``fraction`` of the images with all their captions (tensors only)."""
    if not 0 < fraction <= 1:
        raise VLSearchError(f"--subset must be a fraction in (0, 1], not {fraction}")
    n = feats.n_images
    return select_images(
        feats, np.sort(np.random.default_rng(seed).permutation(n)[: max(2, round(fraction * n))])
    )


def bimodal_contrastive(
    im: torch.Tensor, tx: torch.Tensor, scale: torch.Tensor, same: torch.Tensor, intra_weight: float = 1.0
) -> torch.Tensor:
    """Bi-modal contrastive loss over B (image, caption) rows.

    Every embedding of the 2B is an anchor whose positive is its pair in the other modality; its negatives
    are the other modality's rows (as InfoNCE) *and* its own modality's other rows (bi-modal negatives,
    weighted by ``intra_weight`` in the denominator). ``same`` [B,B] marks rows of the same image, which are
    never negatives.
    """
    cross = scale * im @ tx.t()  # [B,B]
    ii = scale * im @ im.t()
    tt = scale * tx @ tx.t()
    eye = torch.eye(len(im), dtype=torch.bool)
    off = same & ~eye
    neg_inf = float("-inf")
    log_w = math.log(intra_weight) if intra_weight > 0 else neg_inf
    target = torch.arange(len(im))
    losses = []
    for c, intra in ((cross, ii), (cross.t(), tt)):
        c = c.masked_fill(off, neg_inf)
        intra = (intra + log_w).masked_fill(same, neg_inf)
        losses.append(F.cross_entropy(torch.cat([c, intra], 1), target))
    return 0.5 * (losses[0] + losses[1])


def _grouped_batches(
    neighbours: np.ndarray, pool: np.ndarray, batch: int, group: int, rng
) -> list[np.ndarray]:
    """Batches of unique images made of groups: an anchor and its ``group - 1`` most confusable images."""
    anchors = rng.permutation(pool)
    batches, cur, used = [], [], set()
    for a in anchors:
        if a in used:
            continue
        members = [a] + [int(n) for n in neighbours[a] if n not in used and n not in cur][: group - 1]
        for m in members:
            if m not in cur:
                cur.append(m)
        used.update(members)
        if len(cur) >= batch:
            batches.append(np.array(cur[:batch]))
            cur = cur[batch:]
    return batches


def _image_neighbours(img: np.ndarray, k: int) -> np.ndarray:
    sim = torch.from_numpy(img) @ torch.from_numpy(img).T
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(min(k, len(img) - 1), dim=1).indices.numpy()


def _distill_lists(model, joint, target, imgs, caps, tx, neighbours, tc) -> torch.Tensor:
    """KL(joint || decomposed) over the first captions' image lists (own image + nearest neighbours)."""
    q = min(tc.distill_queries, len(imgs))
    n = min(tc.distill_list, neighbours.shape[1] + 1)
    own = imgs[:q]
    lists = torch.cat([own[:, None], torch.from_numpy(neighbours[own.numpy(), : n - 1])], 1)  # [q, n]
    flat = lists.reshape(-1)
    grid = target.grid[flat].float()
    mid = target.mid[flat].float() if model.config.use_mid else None
    rows = caps[:q].repeat_interleave(n)
    with torch.no_grad(), autocast(tc.bf16):
        teacher = joint.joint_logits_bucketed(
            joint.image_tokens(grid, mid), target.states[rows], target.lengths[rows]
        ).view(q, n)
    with autocast(tc.bf16):
        e_img = model.encode_image(grid, mid).float().view(q, n, -1)
    student = model.scale * (tx[:q, None, :] * e_img).sum(-1)
    T = tc.distill_temperature
    kl = F.kl_div(
        F.log_softmax(student / T, -1),
        F.log_softmax(teacher.float() / T, -1),
        log_target=True,
        reduction="batchmean",
    )
    return kl * T * T


def train_decomposed(
    joint: DeformerModel,
    target: DatasetFeatures,
    tc: DecomposeTrainConfig | None = None,
    dev: DatasetFeatures | None = None,
    progress: bool = True,
    log=print,
) -> tuple[DeformerModel, dict]:
    """Fine-tune a copy of ``joint`` in decomposed mode on ``target`` (the small subset)."""
    tc = tc or DecomposeTrainConfig()
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    joint = joint.eval()
    model = copy.deepcopy(joint).set_mode("decomposed").requires_grad_(True)
    opt = _optimizer(model, tc.lr, tc.layer_lr, tc.weight_decay, FROM_FAST)
    caps_of = captions_of_images(target.caption_image, target.n_images)
    pool = np.array([i for i, c in enumerate(caps_of) if c])
    steps_per_epoch = max(1, len(pool) // tc.batch_size)
    total = steps_per_epoch * tc.epochs
    budget = 60 * tc.minutes
    history: dict = {"loss": [], "dev": []}
    best = None  # (dev mean recall, epoch, weights): the decomposition keeps its best dev state
    if dev is not None:
        m = decomposed_metrics(model, dev)
        history["dev"].append({"epoch": 0, **m})
        best = (m["mean_recall"], 0, copy.deepcopy(model.state_dict()))
        log(f"decomposed before fine-tuning: dev {_fmt(m)}")
    bar = tqdm(
        total=total, desc="decompose deformer", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    t0 = time.time()
    step, done = 0, False
    for epoch in range(tc.epochs):
        img_emb, _ = embed_decomposed(model, target)  # hard negatives: re-mined by the model itself
        neighbours = _image_neighbours(img_emb, max(2 * tc.group, tc.distill_list))
        model.train()
        for imgs in _grouped_batches(neighbours, pool, tc.batch_size, tc.group, rng):
            frac = _progress(step, total, t0, budget)
            if frac >= 1.0:
                done = True
                break
            _set_lr(opt, warmup_cosine(step, tc.warmup_steps, frac))
            imgs = torch.from_numpy(imgs)
            caps = torch.tensor([caps_of[i][rng.integers(len(caps_of[i]))] for i in imgs.tolist()])
            grid, mid = _image_inputs(target, imgs, tc.flip, tc.feature_dropout, gen, model.config.use_mid)
            with autocast(tc.bf16):
                im = model.encode_image(grid, mid)
                tx = model.encode_text(target.states[caps], target.lengths[caps])
            same = imgs[:, None] == imgs[None, :]
            loss = bimodal_contrastive(im.float(), tx.float(), model.scale, same, tc.intra_weight)
            if tc.distill_weight:
                loss = loss + tc.distill_weight * _distill_lists(
                    model, joint, target, imgs, caps, tx.float(), neighbours, tc
                )
            optimizer_step(model, opt, loss)
            step += 1
            history["loss"].append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if dev is not None and (done or epoch == tc.epochs - 1 or (epoch + 1) % max(1, tc.epochs // 4) == 0):
            m = decomposed_metrics(model, dev)
            history["dev"].append({"epoch": epoch + 1, "step": step, **m})
            log(f"epoch {epoch + 1} step {step}: dev {_fmt(m)} ({time.time() - t0:.0f}s)")
            if m["mean_recall"] > best[0]:
                best = (m["mean_recall"], epoch + 1, copy.deepcopy(model.state_dict()))
        if done:
            break
    bar.close()
    if best is not None:
        model.load_state_dict(best[2])
        history["best_epoch"] = best[1]
        log(f"kept the best dev state: epoch {best[1]} (mean recall {best[0]:.2f})")
    history["steps"] = step
    history["train_seconds"] = time.time() - t0
    return model.eval(), history


# -- CLI entry point (`vlsearch train deformer`) --------------------------------------------------------
def train_decomposed_and_save(req: TrainRequest, extra: dict | None = None, joint: str | None = None):
    """`vlsearch train deformer [--subset F]`: decompose the trained ``deformer-joint`` on a train subset."""
    tc = apply_overrides(DecomposeTrainConfig(seed=req.seed), req, extra)
    if req.subset:
        tc.subset = req.subset
    if req.distill_weight is not None:
        tc.distill_weight = req.distill_weight
    if req.distill_temperature is not None:
        tc.distill_temperature = req.distill_temperature
    joint_name = joint or req.joint or "deformer-joint"
    net, _, joint_path = load_model(joint_name)
    if not isinstance(net, DeformerModel):
        raise CheckpointError(
            f"{joint_name!r} is a {net.model_type!r} model, not a deformer: give --joint a deformer-joint checkpoint"
        )
    log = req.log
    mid = net.config.use_mid
    train, dev = load_split(req, "train", mid), load_dev(req, mid)
    target = subset_features(train, tc.subset, tc.seed)
    log(f"decomposing on {target.n_images} images / {len(target.states)} captions ({tc.subset:.0%} of train)")
    model, history = train_decomposed(net, target, tc, dev=dev, progress=req.progress, log=log)
    meta = {
        "train": asdict(tc),
        "joint": str(joint_path),
        "data_root": str(req.data_root or "default"),
        "subset_images": target.n_images,
        "dev": [d for d in history["dev"] if d["epoch"] == history.get("best_epoch")] or None,
        "best_epoch": history.get("best_epoch"),
        "dev_history": history["dev"],  # every evaluated epoch: what the fine-tuning did, kept or not
        "steps": history["steps"],
        "train_seconds": history["train_seconds"],
    }
    return save_checkpoint(checkpoint_out(req.out, "deformer"), model, meta)

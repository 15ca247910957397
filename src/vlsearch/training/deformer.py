"""Training VLDeformer in its two stages (Zhang et al. 2021, arXiv 2110.11338).

1. ``train_joint`` (named model ``deformer-joint``): the early-interaction transformer learns image-text
   matching on Flickr8k train. Listwise ITM: every caption ranks its image against hard negatives mined by
   the Fast model (plus random ones), every image ranks one of its captions against the Fast model's hard
   negative captions, both by softmax cross-entropy over the joint model's scores. Multi-task: the same
   weights also run on each modality alone and those pooled embeddings get a symmetric InfoNCE, so the
   shared weights support both modes from the start.
2. ``train_decomposed`` (named model ``deformer``; in training/decompose.py): the joint checkpoint, switched to ``mode="decomposed"``,
   is fine-tuned on a *small* target subset of train (``--subset``, default 0.2) with the bi-modal
   hard-negative contrastive loss: each image/caption embedding is contrasted with the other modality's
   embeddings *and* with its own modality's (bi-modal negatives), in batches grouped from mutually
   confusable images (hard negatives, re-mined each epoch with the model being fine-tuned).

Training is time-boxed (``--minutes``); the learning rate anneals on whichever of the step and time
budgets runs out first.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.errors import VLSearchError
from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.models.deformer import DeformerConfig, DeformerModel
from vlsearch.models.fast import set_hubness
from vlsearch.models.registry import load_model
from vlsearch.precision import autocast
from vlsearch.settings import checkpoint_out
from vlsearch.training.common import (
    TrainRequest,
    apply_overrides,
    captions_of_images,
    dev_metrics,
    hflip,
    load_dev,
    load_split,
    optimizer_step,
    warmup_cosine,
)
from vlsearch.training.crossfit import FoldPriors, fold_priors
from vlsearch.training.losses import candidate_kl, info_nce
from vlsearch.training.mining import mine_hard_negatives


@dataclass
class JointTrainConfig:
    epochs: int = 10  # passes over the train images (46 steps each at batch 128; ~11 min on 2 idle cores)
    minutes: float = 15.0  # wall-clock cap
    batch_size: int = 128  # contrastive batch (separately run streams)
    itm_queries: int = 16  # captions (and images) per step with an ITM list each
    itm_hard: int = 6  # hard negatives per list, drawn from the Fast model's top ``mine_k``
    itm_random: int = 1  # random negatives per list
    mine_k: int = 20
    itm_weight: float = 1.0
    contrastive_weight: float = 1.0
    lr: float = 1e-3  # new parameters (projections, embeddings, heads)
    layer_lr: float = 1e-5  # pretrained parameters (MiniLM layers; with init_from="fast" the Fast towers)
    gate_lr: float = 1e-2  # the cross-modal attention gates (no weight decay)
    weight_decay: float = 0.05
    warmup_steps: int = 50
    flip: bool = True
    feature_dropout: float = 0.1
    # the dual encoder that mines the hard negatives and warm-starts the model: the distilled Fast model,
    # the best dual encoder `make models` has by then (it learned from the Slow model's scores)
    fast_model: str = "fast-distilled"
    # "minilm": shared layers from MiniLM, the rest fresh; "fast": warm start from the trained Fast model
    # (its text tower = the shared layers + text head, its image tower = the image tower), so the
    # decomposed model starts as that Fast model and the joint one adds interaction on top
    init_from: str = "fast"
    # with a Fast warm start: keep the separately run streams exactly that Fast model (its towers, the
    # shared layers, and the zero image-token head stay frozen), so the joint model is the Fast model plus
    # the cross-modal interaction (gates, image tokens, ITM head) learned on the Fast model's hard negatives
    freeze_streams: bool = True
    # a pair scorer (e.g. "slow") to learn from: each ITM list also matches (KL, weight teacher_weight) the
    # distribution of the teacher's re-ranking score there, scale * (stream cosine + w * teacher score) with
    # w the teacher's dev-chosen fusion weight. On train the streams have memorised their pairs, so the
    # plain ITM target is nearly solved before any interaction; the teacher says what re-ranking adds.
    teacher: str = "slow"  # "" (or "none" on the CLI): plain ITM
    teacher_weight: float = 1.0
    # >= 2 (with frozen streams): out-of-fold streams (training/crossfit.py). Each step's images come from
    # one fold, and the streams are, for that step, a Fast model trained without that fold (as is the
    # teacher's Fast prior), so the interaction learns on stream scores like those of unseen images; the
    # saved model carries the full ``fast_model`` streams.
    stream_folds: int = 0
    seed: int = 0
    bf16: bool = True


# -- helpers ---------------------------------------------------------------------------------------------
def _progress(step: int, total: int, t0: float, budget_s: float) -> float:
    return max(step / max(1, total), (time.time() - t0) / max(1e-9, budget_s))


# parameters that come pretrained: MiniLM's layers, and with a Fast warm start its towers too
PRETRAINED = ("layers.",)
FROM_FAST = ("layers.", "text_embed.", "tower_", "logit_scale")
# what the separately run streams read: frozen with ``freeze_streams`` (image_embed starts at zero)
# (and the Fast model's concept channel, frozen everywhere)
STREAMS = (*FROM_FAST, "image_embed.", "text_type", "concept.")


def _optimizer(
    model: DeformerModel, lr: float, layer_lr: float, wd: float, pretrained=PRETRAINED, gate_lr=None
) -> torch.optim.AdamW:
    """Pretrained parameters (names starting with ``pretrained``) at ``layer_lr``, the cross-modal gates
    at ``gate_lr`` (default ``lr``) without weight decay, the rest at ``lr``."""
    named = list(model.named_parameters())
    old = [p for n, p in named if n.startswith(pretrained)]
    gates = [p for n, p in named if n == "cross_gate"]
    new = [p for n, p in named if not n.startswith(pretrained) and n != "cross_gate"]
    g_lr = lr if gate_lr is None else gate_lr
    return torch.optim.AdamW(
        [
            {"params": new, "lr": lr, "base": lr},
            {"params": old, "lr": layer_lr, "base": layer_lr},
            {"params": gates, "lr": g_lr, "base": g_lr, "weight_decay": 0.0},
        ],
        weight_decay=wd,
    )


def _set_lr(opt, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base"] * factor


def _image_inputs(feats: DatasetFeatures, rows, flip: bool, dropout: float, gen: torch.Generator, use_mid):
    """Grid (and mid) of these image rows as float32, with a random horizontal flip and feature dropout."""
    grid = feats.grid[rows].float()
    mid = feats.mid[rows].float() if use_mid else None
    if flip and torch.rand((), generator=gen) < 0.5:
        grid, mid = hflip(grid), hflip(mid)
    if dropout:
        grid = F.dropout(grid, dropout)
    return grid, mid


def _fold_batches(pools: list[np.ndarray], batch_size: int, rng) -> list[tuple[int, np.ndarray]]:
    """One epoch of (fold, image rows) batches: each batch from one fold's shuffled pool (at least one,
    short if the fold is), folds interleaved in a random order (one fold, without folds)."""
    batches = [
        (k, order[s * batch_size : (s + 1) * batch_size])
        for k, pool in enumerate(pools)
        for order in [rng.permutation(pool)]
        for s in range(max(1, len(pool) // batch_size))
    ]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def _load_streams(model: DeformerModel, fast) -> None:
    """The separately run streams become this Fast model's (the interaction parameters stay)."""
    model.init_from_fast(fast)


@torch.no_grad()
def embed_decomposed(model: DeformerModel, feats: DatasetFeatures, batch: int = 512):
    """(image embeddings [N,D], caption embeddings [M,D]) of the separately run streams, numpy."""
    model.eval()
    mid = feats.mid if model.config.use_mid else None
    with autocast():
        img = torch.cat(
            [
                model.encode_image(feats.grid[s : s + batch], None if mid is None else mid[s : s + batch])
                for s in range(0, feats.n_images, batch)
            ]
        ).float()
        order = torch.argsort(feats.lengths)  # similar lengths together: less padding
        txt = torch.empty(len(order), model.embed_dim)
        for s in range(0, len(order), batch):
            rows = order[s : s + batch]
            txt[rows] = model.encode_text(feats.states[rows], feats.lengths[rows]).float()
    return img.numpy(), txt.numpy()


def decomposed_metrics(model: DeformerModel, feats: DatasetFeatures) -> dict:
    return dev_metrics(model, feats, embed_decomposed)


def _fmt(m: dict) -> str:
    return f"t2i R@1 {m['t2i']['r1']:.1f} i2t R@1 {m['i2t']['r1']:.1f} mean recall {m['mean_recall']:.2f}"


def fast_hard_negatives(fast, feats: DatasetFeatures, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hard negatives of a trained dual encoder (a model, or a name such as ``fast``) on these features."""
    if isinstance(fast, str):
        fast = load_model(fast)[0]
        set_hubness(fast, False)
    return mine_hard_negatives(fast, feats, k)


# -- stage 1: the joint model ------------------------------------------------------------------------------
def train_joint(
    train: DatasetFeatures,
    hard: tuple[np.ndarray, np.ndarray],
    config: DeformerConfig | None = None,
    tc: JointTrainConfig | None = None,
    dev: DatasetFeatures | None = None,
    progress: bool = True,
    log=print,
    fast=None,
    teacher=None,
    folds: FoldPriors | None = None,
) -> tuple[DeformerModel, dict]:
    """``hard`` = (neg_images_per_caption [M,k], neg_captions_per_image [N,k]) on ``train``, best first;
    ``fast``: the FastModel to warm-start from when ``tc.init_from == "fast"``; ``teacher``: the pair
    scorer named by ``tc.teacher`` (its features: ``train`` with mid); ``folds``: out-of-fold streams
    (``hard`` then comes from the fold models, inside each fold)."""
    config = config or DeformerConfig()
    tc = tc or JointTrainConfig()
    config.mode = "joint"
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    if tc.init_from == "fast":
        if fast is None:
            raise VLSearchError(
                "init_from='fast' needs the trained Fast model: train it first (`vlsearch train fast-distilled`)"
            )
        aligned = config.aligned_with_fast(fast.config)
        if aligned != config:
            log("warm start from the Fast model: text layers, embed_dim and image tower follow its config")
        config = aligned
    model = DeformerModel(config)
    if tc.init_from == "fast":
        model.init_from_fast(fast)
    elif tc.init_from != "minilm":
        raise VLSearchError(f"init_from must be 'minilm' or 'fast', not {tc.init_from!r}")
    warm = FROM_FAST if tc.init_from == "fast" else PRETRAINED
    frozen = tc.init_from == "fast" and tc.freeze_streams
    if frozen:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(STREAMS))
    opt = _optimizer(model, tc.lr, tc.layer_lr, tc.weight_decay, warm, tc.gate_lr)
    neg_img = torch.from_numpy(np.asarray(hard[0])[:, : tc.mine_k])
    neg_cap = torch.from_numpy(np.asarray(hard[1])[:, : tc.mine_k])
    caps_of = captions_of_images(train.caption_image, train.n_images)
    pool = np.array([i for i, c in enumerate(caps_of) if c])
    if folds is not None and not frozen:
        raise VLSearchError("out-of-fold streams need frozen streams from a Fast warm start")
    fold_of = np.zeros(train.n_images, np.int64) if folds is None else folds.fold_of_image
    n_folds = int(fold_of.max()) + 1
    fold_pools = [pool[fold_of[pool] == k] for k in range(n_folds)]
    fold_caps = [np.flatnonzero(fold_of[train.caption_image.numpy()] == k) for k in range(n_folds)]
    steps_per_epoch = max(1, sum(len(p) // tc.batch_size for p in fold_pools))
    total = steps_per_epoch * tc.epochs
    budget = 60 * tc.minutes
    use_mid = config.use_mid
    q, n_list = tc.itm_queries, 1 + tc.itm_hard + tc.itm_random
    history: dict = {"loss": [], "dev": []}
    bar = tqdm(
        total=total, desc="train deformer-joint", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    t0 = time.time()
    step = 0
    done = False
    streams_of = None  # the fold whose streams the model holds now (None: the full model's)
    for epoch in range(tc.epochs):
        model.train()
        batches = _fold_batches(fold_pools, tc.batch_size, rng)
        for fold, batch in batches:
            frac = _progress(step, total, t0, budget)
            if frac >= 1.0:
                done = True
                break
            _set_lr(opt, warmup_cosine(step, tc.warmup_steps, frac))
            if folds is not None and streams_of != fold:
                _load_streams(model, folds.models[fold])
                streams_of = fold
            imgs = torch.from_numpy(batch)
            caps = torch.tensor([caps_of[i][rng.integers(len(caps_of[i]))] for i in imgs.tolist()])
            # ITM lists: caption -> [own image, hard images.., random images..]; image -> [own caption, ..]
            qc, qi = caps[:q], imgs[:q]
            hard_i = neg_img[qc][:, torch.randperm(neg_img.shape[1], generator=gen)[: tc.itm_hard]]
            rand_i = torch.from_numpy(rng.choice(fold_pools[fold], (q, tc.itm_random)))
            list_img = torch.cat([qi[:, None], hard_i, rand_i], 1)  # [q, n_list]
            hard_c = neg_cap[qi][:, torch.randperm(neg_cap.shape[1], generator=gen)[: tc.itm_hard]]
            rand_c = torch.from_numpy(rng.choice(fold_caps[fold], (q, tc.itm_random)))
            list_cap = torch.cat([qc[:, None], hard_c, rand_c], 1)  # [q, n_list]
            # all images needed this step get one token computation (shared augmentation)
            need = torch.unique(torch.cat([imgs, list_img.reshape(-1)]))
            where = torch.full((train.n_images,), -1, dtype=torch.long)
            where[need] = torch.arange(len(need))
            grid, mid = _image_inputs(train, need, tc.flip, tc.feature_dropout, gen, use_mid)
            with autocast(tc.bf16):
                img_tok = model.image_tokens(grid, mid)
                # (a) contrastive on the separately run streams
                loss = torch.zeros(())
                if tc.contrastive_weight and not frozen:  # (frozen streams: nothing to train)
                    own = img_tok[where[imgs]]
                    im = model.image_embedding(model.run_layers(own.tokens, None).mean(1), own)
                    tx = model.stream_text(train.states[caps], train.lengths[caps])
                    same = imgs[:, None] == imgs[None, :]
                    loss = loss + tc.contrastive_weight * info_nce(im, tx.float(), model.scale, same)
                # (b) listwise ITM, both directions, on the joint sequence
                if tc.itm_weight:
                    t_rows = torch.cat([qc[:, None].expand(q, n_list), list_cap], 0).reshape(-1)
                    i_rows = torch.cat([list_img, qi[:, None].expand(q, n_list)], 0).reshape(-1)
                    logits = model.joint_logits_bucketed(
                        img_tok[where[i_rows]], train.states[t_rows], train.lengths[t_rows]
                    ).view(2 * q, n_list)
                    target = torch.zeros(2 * q, dtype=torch.long)
                    loss = loss + tc.itm_weight * F.cross_entropy(logits, target)
                    if teacher is not None and tc.teacher_weight:
                        swap = contextlib.nullcontext()
                        if folds is not None and getattr(teacher, "prior", None) is not None:
                            swap = teacher.prior_swapped(
                                folds.models[fold]
                            )  # the teacher's prior out of fold too
                        with swap:
                            wanted = teacher_list_logits(model, teacher, train, t_rows, i_rows, q)
                        loss = loss + tc.teacher_weight * candidate_kl(logits, wanted.view(2 * q, n_list))
            optimizer_step(model, opt, loss)
            step += 1
            history["loss"].append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", T=f"{1 / float(model.scale.detach()):.3f}")
        if dev is not None and (done or epoch == tc.epochs - 1 or (epoch + 1) % max(1, tc.epochs // 4) == 0):
            if streams_of is not None:  # dev sees the full model's streams, as the saved model will
                _load_streams(model, fast)
                streams_of = None
            m = decomposed_metrics(model, dev)
            history["dev"].append({"epoch": epoch + 1, "step": step, "streams": m})
            log(f"epoch {epoch + 1} step {step}: dev (separate streams) {_fmt(m)} ({time.time() - t0:.0f}s)")
        if done:
            break
    bar.close()
    if streams_of is not None:
        _load_streams(model, fast)
    model.requires_grad_(True)
    history["steps"] = step
    history["train_seconds"] = time.time() - t0
    return model.eval(), history


@torch.no_grad()
def teacher_list_logits(model: DeformerModel, teacher, train: DatasetFeatures, t_rows, i_rows, q: int):
    """The teacher's re-ranking logits for the pairs (t_rows[p], i_rows[p]) of 2q ITM lists (the first q
    rank images for a caption, the last q captions for an image): scale * (the model's stream cosine +
    w * teacher score), w per direction as chosen on dev for the teacher; un-augmented features."""
    t_u, t_inv = torch.unique(t_rows, return_inverse=True)
    i_u, i_inv = torch.unique(i_rows, return_inverse=True)
    grid, mid = train.grid[i_u], None if train.mid is None else train.mid[i_u]
    scores = teacher.score_texts_images(
        train.states[t_u],
        train.lengths[t_u],
        grid if getattr(teacher.config, "use_grid", True) else None,
        mid,
        t_inv,
        i_inv,
    ).float()
    was_training = model.training
    model.eval()
    with autocast():
        te = model.encode_text(train.states[t_u], train.lengths[t_u]).float()
        ie = model.encode_image(grid, mid if model.config.use_mid else None).float()
    model.train(was_training)
    cosine = (te[t_inv] * ie[i_inv]).sum(-1)
    n = len(t_rows) // (2 * q)
    w = torch.cat(
        [
            torch.full((q * n,), float(teacher.config.fusion_weight)),
            torch.full(
                (q * n,), float(getattr(teacher.config, "fusion_weight_i2t", teacher.config.fusion_weight))
            ),
        ]
    )
    return model.scale.detach().float() * (cosine + w * scores)


# -- CLI entry points (`vlsearch train deformer-joint`, `vlsearch train deformer`) -----------------------
def train_joint_and_save(req: TrainRequest, extra: dict | None = None, config: DeformerConfig | None = None):
    """`vlsearch train deformer-joint`: the early-interaction model on Flickr8k train."""
    tc = apply_overrides(JointTrainConfig(seed=req.seed), req, extra)
    if req.teacher is not None:
        tc.teacher = "" if req.teacher.lower() in ("", "none") else req.teacher
    config = config or DeformerConfig()
    log = req.log
    mid = config.use_mid or bool(tc.teacher)
    train, dev = load_split(req, "train", mid), load_dev(req, mid)
    teacher, teacher_path = load_model(tc.teacher)[::2] if tc.teacher else (None, None)

    t0 = time.time()
    fast, fast_meta, fast_path = load_model(tc.fast_model)
    set_hubness(fast, False)  # mining and warm start as measured (docs/deformer.md)
    folds = None
    if tc.stream_folds >= 2:
        recipe = fast_meta.get("train", {})
        folds = fold_priors(train, fast, recipe, tc.stream_folds, tc.mine_k, tc.seed, req.progress, log)
        hard = (folds.neg_img, folds.neg_cap)
    else:
        hard = fast_hard_negatives(fast, train, tc.mine_k)
    log(
        f"mined {hard[0].shape[1]} hard negatives per caption with {tc.fast_model!r} ({time.time() - t0:.0f}s)"
    )
    model, history = train_joint(
        train,
        hard,
        config,
        tc,
        dev=dev,
        progress=req.progress,
        log=log,
        fast=fast,
        teacher=teacher,
        folds=folds,
    )
    meta = {
        "train": asdict(tc),
        "fast": str(fast_path),
        "teacher": None if teacher_path is None else str(teacher_path),
        "data_root": str(req.data_root or "default"),
        "dev": history["dev"][-1:] or None,
        "steps": history["steps"],
        "train_seconds": history["train_seconds"],
    }
    return save_checkpoint(checkpoint_out(req.out, "deformer-joint"), model, meta)

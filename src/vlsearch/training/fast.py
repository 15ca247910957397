"""Training the Fast dual encoder: symmetric InfoNCE with a learnable temperature, optionally distilled
from a Slow teacher (Miech et al. 2021, Sec. 3.3)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.models.embed import embed_features  # noqa: F401 - also importable from here, as before
from vlsearch.models.fast import FastConfig, FastModel
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
    map_side,
    optimizer_step,
    warmup_cosine,
)
from vlsearch.training.concepts import PseudoCaptions, attach_concepts, choose_concept_weight
from vlsearch.training.hubness import attach_hubness, choose_hubness_weight
from vlsearch.training.losses import info_nce


@dataclass
class FastTrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    text_lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grid_augment: bool = True
    feature_dropout: float = 0.1
    seed: int = 0
    bf16: bool = True
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_teacher: str | None = None
    # Concept channel (vlsearch.encoders.concepts): weight chosen on dev after training (0 = leave it out).
    concepts: bool = True
    concept_prompts: str = "gloss"  # session 13: concepts alone dev RSUM 73.8 -> 83.9 against "single"
    concept_topk: int = 10  # sparse form: chosen on Flickr8k dev (RSUM 286.9 against 285.3 with all 1,000)
    concept_temperature: float = 1.0
    concept_input: bool = False  # the image tower also sees the concept vector (trained with it)
    # Hubness prior (models/hubness.py): calibrated after the concept channel, weight chosen on dev.
    hubness: bool = True
    # Pseudo-captions (training.concepts.PseudoCaptions): weight of their InfoNCE term (0 = none), and the
    # top-class probability an image needs to get one.
    pseudo_weight: float = 0.0
    pseudo_threshold: float = 0.5
    pseudo_text_only: bool = False  # the pseudo term trains the text tower only (image side detached)
    # Train the towers on the fused score (Fast + w x concepts, the frozen zero-shot channel in the loss),
    # so they learn what the concepts lack; 0 = Fast alone, the channel added after training.
    concept_train_weight: float = 0.2  # session 13, measured in docs/concepts.md


def augment_grid(grid: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Feature-level augmentation of [B,side*side,C] grids: random horizontal flip and a random square
    crop window of side-2 .. side cells (5..7 on the 7x7 grid)."""
    B, _, C = grid.shape
    side = map_side(grid)
    if torch.rand((), generator=gen) < 0.5:
        grid = hflip(grid)
    g = grid.reshape(B, side, side, C)
    size = int(torch.randint(side - 2, side + 1, (), generator=gen))
    y0, x0 = (int(torch.randint(0, side + 1 - size, (), generator=gen)) for _ in range(2))
    return g[:, y0 : y0 + size, x0 : x0 + size].reshape(B, -1, C)


def fast_config(tc: FastTrainConfig) -> FastConfig:
    """The model shape a training config trains: the concept channel is inside the model during training
    when the tower takes it as input or the loss sees the fused score, with the prompts, temperature and
    top-k it will be served with."""
    return FastConfig(
        concepts=tc.concept_input or tc.concept_train_weight > 0,
        concept_input=tc.concept_input,
        concept_weight=tc.concept_train_weight,
        concept_topk=tc.concept_topk,
        concept_temperature=tc.concept_temperature,
        concept_prompts=tc.concept_prompts,
    )


def _lr_lambda(total: int, warmup: int):
    return lambda step: warmup_cosine(step, warmup, step - warmup, max(1, total - warmup))


def train_fast(
    train: DatasetFeatures,
    config: FastConfig = FastConfig(),
    tc: FastTrainConfig = FastTrainConfig(),
    dev: DatasetFeatures | None = None,
    teacher=None,
    progress: bool = True,
    log=print,
) -> tuple[FastModel, dict]:
    """Returns the trained model and a history dict.

    ``teacher`` enables distillation: ``teacher.loss(model, train, imgs, caps, image_emb, text_emb, temperature)``
    returns the extra loss term (e.g. ``candidate_kl`` between the student's and the Slow model's scores).
    """
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    model = FastModel(config)
    text_params = [p for n, p in model.named_parameters() if n.startswith("text_layers.")]
    other = [p for n, p in model.named_parameters() if not n.startswith("text_layers.")]
    opt = torch.optim.AdamW(
        [{"params": other, "lr": tc.lr}, {"params": text_params, "lr": tc.text_lr}],
        weight_decay=tc.weight_decay,
    )
    captions_of = captions_of_images(train.caption_image, train.n_images)
    has_caps = np.array([len(c) > 0 for c in captions_of])
    image_pool = np.flatnonzero(has_caps)
    # a split smaller than one batch takes one step on all of it, not none (as the deformer trainers do)
    steps_per_epoch = max(1, len(image_pool) // tc.batch_size)
    total = steps_per_epoch * tc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, tc.warmup_steps))
    rng = np.random.default_rng(tc.seed)
    history = {"loss": [], "dev": []}
    pseudo = PseudoCaptions(train.grid, tc.pseudo_threshold) if tc.pseudo_weight > 0 else None
    if pseudo is not None:
        history["pseudo"] = {"images": pseudo.n_images, "classes": pseudo.n_classes}
        log(f"pseudo-captions: {pseudo.n_images} of {train.n_images} images, {pseudo.n_classes} classes")
    bar = tqdm(total=total, desc="train fast", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t0 = time.time()
    for epoch in range(tc.epochs):
        model.train()
        order = rng.permutation(image_pool)
        for s in range(steps_per_epoch):
            imgs = torch.from_numpy(order[s * tc.batch_size : (s + 1) * tc.batch_size])
            caps = torch.tensor([captions_of[i][rng.integers(len(captions_of[i]))] for i in imgs.tolist()])
            grid = train.grid[imgs].float()
            if tc.grid_augment:
                grid = augment_grid(grid, gen)
            if tc.feature_dropout:
                grid = torch.nn.functional.dropout(grid, tc.feature_dropout)
            L = int(train.lengths[caps].max())
            states, lengths = train.states[caps, :L], train.lengths[caps]
            with autocast(tc.bf16):
                im = model.encode_image(grid)
                tx = model.encode_text(states, lengths)
            im, tx = im.float(), tx.float()
            loss = info_nce(im, tx, model.scale)
            if teacher is not None and tc.distill_weight > 0:
                loss = loss + tc.distill_weight * teacher.loss(
                    model, train, imgs, caps, im, tx, tc.distill_temperature
                )
            if pseudo is not None:
                loss = loss + tc.pseudo_weight * pseudo.loss(
                    model, imgs, im.detach() if tc.pseudo_text_only else im, rng, tc.bf16
                )
            optimizer_step(model, opt, loss)
            sched.step()
            history["loss"].append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", T=f"{1 / float(model.scale.detach()):.3f}")
        if (
            dev is not None
            and (epoch + 1) % max(1, tc.epochs // 5) == 0
            or (dev is not None and epoch == tc.epochs - 1)
        ):
            m = dev_metrics(model, dev)
            history["dev"].append({"epoch": epoch + 1, **m})
            log(
                f"epoch {epoch + 1}: dev t2i R@1 {m['t2i']['r1']:.1f} i2t R@1 {m['i2t']['r1']:.1f} rsum {m['rsum']:.1f} ({time.time() - t0:.0f}s)"
            )
    bar.close()
    history["train_seconds"] = time.time() - t0
    return model.eval(), history


def train_and_save(req: TrainRequest, teacher=None, extra: dict | None = None) -> Path:
    """`vlsearch train fast`: train on Flickr8k train, report dev, save the checkpoint."""
    tc = apply_overrides(FastTrainConfig(seed=req.seed), req, extra)
    if req.no_concepts:  # Fast alone: no channel in the checkpoint, none in the loss
        tc.concepts, tc.concept_train_weight = False, 0.0
    if req.concept_input:
        tc.concept_input = True
    if req.pseudo_weight is not None:
        tc.pseudo_weight = float(req.pseudo_weight)
    progress = req.progress
    dev = load_dev(req)
    name = "fast-distilled" if teacher is not None else "fast"
    if req.init:  # reuse a trained Fast model's weights: only the concept channel is (re)calibrated
        model, init_meta, _ = load_model(req.init)
        history = {"dev": init_meta.get("dev") or [], "train_seconds": init_meta.get("train_seconds")}
        calibration = ("concepts", "concept_prompts", "concept_topk", "concept_temperature", "hubness")
        keep = {k: getattr(tc, k) for k in calibration}
        # how the reused weights were trained; older checkpoints predate the fused loss and pseudo-captions
        trained = {"concept_train_weight": 0.0, "pseudo_weight": 0.0, **init_meta.get("train", {})}
        tc = FastTrainConfig(**{**trained, **keep})
    else:
        train = load_split(req, "train")
        config = fast_config(tc)
        model, history = train_fast(train, config, tc, dev=dev, teacher=teacher, progress=progress)
    meta = {
        "train": asdict(tc),
        "data_root": str(req.data_root or "default"),
        "dev": history["dev"][-1:] if history["dev"] else None,
        "train_seconds": history["train_seconds"],
    }
    if "pseudo" in history:
        meta["pseudo_captions"] = history["pseudo"]
    if tc.concepts and dev is not None:
        attach_concepts(model, tc.concept_prompts, tc.concept_temperature, tc.concept_topk)
        meta["concepts"] = choose_concept_weight(model, dev, log=print if progress else lambda *_: None)
        if req.init:
            meta["concepts"]["fast_weights_from"] = str(req.init)
    if tc.hubness and dev is not None:
        attach_hubness(model, train if not req.init else load_split(req, "train"))
        meta["hubness"] = choose_hubness_weight(model, dev, log=print if progress else lambda *_: None)
    return save_checkpoint(checkpoint_out(req.out, name), model, meta)

"""Out-of-fold Fast priors for training the Slow model (stacking; issue 12).

The Slow model's score is ``prior_scale x Fast cosine + ITM head``. Trained with the real Fast model as its
prior, it sees Fast scores on the very images Fast was trained on, where Fast is far more confident than on
any gallery it meets later. The head then learns to correct an over-confident prior that does not exist at
query time, and Slow ends up below Fast. Here train is cut into folds by image; for each fold, a Fast model
trained on the *other* folds (same recipe, fewer images) gives that fold's prior scores and mines its hard
negatives within the fold. The Slow model learns on these out-of-fold scores, which look like the full
Fast model's scores on unseen images; the saved checkpoint carries the full Fast model as its prior.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.eval.metrics import retrieval_metrics
from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.models.embed import embed_features
from vlsearch.models.fast import FastConfig, FastModel
from vlsearch.models.registry import load_model
from vlsearch.settings import home
from vlsearch.training.common import select_images
from vlsearch.training.fast import FastTrainConfig, fast_config, train_fast
from vlsearch.training.mining import features_fingerprint, mine_from_embeddings


@dataclass
class FoldPriors:
    """Fold id of every train image, the Fast model that did not see each fold, every caption's hard
    negative images and every image's hard negative captions as that model ranks them inside its own fold
    (global rows)."""

    fold_of_image: np.ndarray  # [N]
    models: list[FastModel]
    neg_img: np.ndarray  # [M, k]
    neg_cap: np.ndarray  # [N, k]


def fold_assignment(n_images: int, folds: int, seed: int) -> np.ndarray:
    """A seeded balanced split of image rows into ``folds`` folds."""
    order = np.random.default_rng(seed).permutation(n_images)
    out = np.empty(n_images, dtype=np.int64)
    out[order] = np.arange(n_images) % folds
    return out


def _with_concepts_of(fold: FastModel, fast: FastModel) -> FastModel:
    """The full Fast model's concept channel (frozen, nothing trained) at its dev-chosen weight, so a fold
    prior scores pairs as the full prior does."""
    if fast.concept is not None:
        for f in fields(FastConfig):
            if f.name.startswith("concept"):
                setattr(fold.config, f.name, getattr(fast.config, f.name))
        fold.concept = fast.concept
    return fold.eval()


def fold_priors(
    train: DatasetFeatures,
    fast: FastModel,
    fast_train: dict,
    folds: int,
    mine_k: int,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> FoldPriors:
    """Train one Fast model per fold on the other folds (recipe ``fast_train``, the full model's saved
    FastTrainConfig), mine each fold's hard negatives with it. Fold models are cached under
    $VLSEARCH_HOME/mining/folds-*, keyed by the data, the recipe, the fold count and the seed."""
    if folds < 2:
        raise ValueError(f"out-of-fold priors need at least 2 folds, not {folds}")
    tc = FastTrainConfig(**{k: v for k, v in fast_train.items() if k in FastTrainConfig.__dataclass_fields__})
    tc.distill_weight, tc.distill_teacher, tc.seed = 0.0, None, seed
    recipe = json.dumps({"train": asdict(tc), "folds": folds}, sort_keys=True)
    key = f"{features_fingerprint(train)}-{hashlib.sha1(recipe.encode()).hexdigest()[:12]}"
    cache = home() / "mining" / f"folds-{key}"
    fold_of = fold_assignment(train.n_images, folds, seed)
    cap_fold = fold_of[train.caption_image.numpy()]
    models, mined = [], []
    for k in range(folds):
        seen, held = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        path = cache / f"fold{k}"
        if (path / "config.json").exists():
            model = load_model(path)[0]
        else:
            log(f"out-of-fold prior {k + 1}/{folds}: Fast on {len(seen)} of {train.n_images} train images")
            config = fast_config(tc)
            fold_tc = replace(tc, batch_size=min(tc.batch_size, len(seen)))  # a tiny train set: >= 1 step
            model, history = train_fast(
                select_images(train, seen), config, fold_tc, progress=progress, log=log
            )
            meta = {"train": asdict(tc), "fold": k, "folds": folds, "train_seconds": history["train_seconds"]}
            save_checkpoint(path, model, meta)
        model = _with_concepts_of(model, fast)
        models.append(model)
        part = select_images(train, held)
        img, txt = embed_features(model, part)
        local_img, local_cap = mine_from_embeddings(img, txt, part.caption_image.numpy(), mine_k)
        held_caps = np.flatnonzero(cap_fold == k)  # select_images keeps captions in row order
        mined.append((held_caps, held[local_img], held, held_caps[local_cap]))  # global rows
    k_img = min(m[1].shape[1] for m in mined)  # a small fold holds fewer than mine_k others
    k_cap = min(m[3].shape[1] for m in mined)
    neg_img = np.zeros((len(train.states), k_img), dtype=np.int64)
    neg_cap = np.zeros((train.n_images, k_cap), dtype=np.int64)
    for caps, ni, imgs, nc in mined:
        neg_img[caps], neg_cap[imgs] = ni[:, :k_img], nc[:, :k_cap]
    return FoldPriors(fold_of, models, neg_img, neg_cap)


@torch.no_grad()
def out_of_fold_metrics(priors: FoldPriors, train: DatasetFeatures) -> list[dict]:
    """Each fold model's recall on its own held-out fold: what the Slow model's prior looks like in
    training (compare with the full Fast model's dev recall)."""
    out = []
    for k, model in enumerate(priors.models):
        part = select_images(train, np.flatnonzero(priors.fold_of_image == k))
        img, txt = embed_features(model, part)
        out.append(retrieval_metrics(txt @ img.T, part.caption_image.numpy()))
    return out

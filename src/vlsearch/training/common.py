"""What the trainers share: the request `vlsearch train` makes, the learning-rate schedule, the flip
augmentation, each image's captions, and loading and scoring the dev split. One copy of each."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from vlsearch.data import load_dataset
from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.errors import MissingSplitError
from vlsearch.eval.metrics import retrieval_metrics
from vlsearch.models.embed import embed_features


@dataclass
class TrainRequest:
    """What `vlsearch train MODEL` asks of a trainer; commands/train.py builds it from the flags (the
    trainers never see argparse). ``None`` means: the model's own default."""

    data_root: str | None = None
    out: str | None = None  # checkpoint folder or a name under the models folder (settings.checkpoint_out)
    epochs: float | None = None
    minutes: float | None = None
    seed: int = 0
    quiet: bool = False
    init: str | None = None  # slow: warm start; fast: reuse these weights, calibrate the concept channel
    distill: str | None = None  # fast: the pair scorer to distill from
    distill_weight: float | None = None
    distill_temperature: float | None = None
    teacher: str | None = None  # deformer-joint: pair scorer to learn from ("none": plain ITM)
    joint: str | None = None  # deformer: the joint checkpoint to decompose
    subset: float | None = None  # deformer: fraction of train for the decomposition
    no_concepts: bool = False
    concept_input: bool = False
    pseudo_weight: float | None = None  # fast: weight of the pseudo-caption term (training.concepts)
    fast_model: str | None = None  # slow: the dual encoder that mines hard negatives (default: fast)
    fast_prior: bool = False  # slow: frozen Fast towers inside the model (score = Fast cosine + head)

    @property
    def progress(self) -> bool:
        return not self.quiet

    def log(self, message: str) -> None:
        """Progress lines on stderr (stdout stays for the saved path), silent with --quiet."""
        if not self.quiet:
            print(message, file=sys.stderr)


def apply_overrides(tc, req, extra: dict | None = None, epochs_field: str = "epochs"):
    """A training config with the request's epochs/minutes (when given and the config has the field)
    and a caller's ``extra`` settings applied; unknown ``extra`` keys are an error, not a silent no-op."""
    if getattr(req, "epochs", None) and hasattr(tc, epochs_field):
        setattr(tc, epochs_field, type(getattr(tc, epochs_field))(req.epochs))
    if getattr(req, "minutes", None) and hasattr(tc, "minutes"):
        tc.minutes = float(req.minutes)
    for key, value in (extra or {}).items():
        if not hasattr(tc, key):
            raise TypeError(f"{type(tc).__name__} has no setting {key!r}")
        setattr(tc, key, value)
    return tc


def warmup_cosine(step: int, warmup: int, done: float, total: float = 1.0) -> float:
    """Learning-rate factor: linear warm-up over the first ``warmup`` steps, then a cosine from 1 to 0 as
    ``done`` goes from 0 to ``total`` (steps after the warm-up, or the fraction of a time-boxed run)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(done, total) / total))


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float = 5.0):
    """One update: gradients of ``loss``, clipped to global norm ``clip``, then the optimizer's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def map_side(x: torch.Tensor) -> int:
    """The side of the square feature map flattened in x [B, side*side, C] (7 for grid, 14 for mid)."""
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"feature map of {x.shape[1]} cells is not square")
    return side


def hflip(x: torch.Tensor | None) -> torch.Tensor | None:
    """Horizontal flip of flattened square feature maps [B, side*side, C] (None passes through)."""
    if x is None:
        return None
    B, n, C = x.shape
    side = map_side(x)
    return x.reshape(B, side, side, C).flip(2).reshape(B, n, C)


def captions_of_images(caption_image, n_images: int) -> list[list[int]]:
    """Caption rows of each image row, in caption order (an image without captions gets [])."""
    out: list[list[int]] = [[] for _ in range(n_images)]
    for c, i in enumerate(np.asarray(caption_image).tolist()):
        out[i].append(c)
    return out


def select_images(feats: DatasetFeatures, rows) -> DatasetFeatures:
    """The images at ``rows`` (in that order) with all their captions, renumbered (tensors only)."""
    keep = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    new = torch.full((feats.n_images,), -1, dtype=torch.long)
    new[keep] = torch.arange(len(keep))
    cap_new = new[feats.caption_image]
    caps = torch.nonzero(cap_new >= 0).squeeze(1)
    return DatasetFeatures(
        feats.dataset,
        feats.grid[keep],
        None if feats.mid is None else feats.mid[keep],
        feats.states[caps],
        feats.lengths[caps],
        feats.token_ids[caps],
        cap_new[caps],
    )


def load_split(req: TrainRequest, split: str, mid: bool = False) -> DatasetFeatures:
    return DatasetFeatures.load(load_dataset(req.data_root, split), mid=mid, progress=req.progress)


def load_dev(req: TrainRequest, mid: bool = False, log=None) -> DatasetFeatures | None:
    """The dev split's features, or None when the dataset has no dev split (said on stderr, as what is
    skipped). Any other failure (unreadable files, a broken cache) is raised, not swallowed."""
    try:
        return load_split(req, "dev", mid)
    except MissingSplitError as e:
        (log or req.log)(f"no dev split, so no dev evaluation: {e}")
        return None


def dev_metrics(model, dev: DatasetFeatures, embed=embed_features) -> dict:
    """Recall both ways on dev of a dual encoder, from ``embed(model, feats) -> (image, text)`` arrays."""
    img, txt = embed(model, dev)
    return retrieval_metrics(txt @ img.T, dev.caption_image.numpy())

"""`vlsearch train MODEL`: train a named model on cached features and save its checkpoint."""

from __future__ import annotations

import importlib
import time
from dataclasses import fields, replace
from pathlib import Path

from vlsearch.commands._common import add_quiet
from vlsearch.models.registry import NAMED_MODELS, default_checkpoint
from vlsearch.settings import checkpoint_out
from vlsearch.training.common import TrainRequest

# named model -> "module:function(TrainRequest) -> checkpoint path"; order matters for `train all`.
TRAINERS = {
    "fast": "vlsearch.training.fast:train_and_save",
    "slow": "vlsearch.training.slow:train_and_save",
    "fast-distilled": "vlsearch.training.distill:train_distilled_and_save",
    "deformer-joint": "vlsearch.training.deformer:train_joint_and_save",
    "deformer": "vlsearch.training.decompose:train_decomposed_and_save",
}


def register(sub):
    p = sub.add_parser(
        "train", help="train a model (fast, slow, fast-distilled, deformer-joint, deformer, or all)"
    )
    p.add_argument("what", choices=[*TRAINERS, "all"])
    p.add_argument(
        "--data-root", default=None, help="Flickr8k-layout root (default: $VLSEARCH_DATA or ../shared/data)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="checkpoint folder, or a name under the models folder (default: the model's name)",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the model's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--distill", default=None, help="fast only: Slow teacher checkpoint or name to distill from"
    )
    p.add_argument(
        "--distill-weight",
        type=float,
        default=None,
        help="fast: weight of the Slow teacher's term; deformer: of the joint model's (0 = contrastive only)",
    )
    p.add_argument("--distill-temperature", type=float, default=None)
    p.add_argument(
        "--teacher",
        default=None,
        help="deformer-joint only: pair scorer to learn from (default: slow; 'none' for plain ITM)",
    )
    p.add_argument(
        "--joint",
        default=None,
        help="deformer only: the joint checkpoint or name to decompose (default: deformer-joint)",
    )
    p.add_argument(
        "--subset",
        type=float,
        default=None,
        help="deformer only: fraction of train used to fine-tune the decomposition",
    )
    p.add_argument("--minutes", type=float, default=None, help="time budget for slow/deformer training")
    p.add_argument(
        "--init",
        default=None,
        help="slow: warm-start from this Slow checkpoint or name (a fresh schedule over --minutes); "
        "fast: reuse this Fast checkpoint's weights and only calibrate the concept channel on dev",
    )
    p.add_argument(
        "--no-concepts", action="store_true", help="fast: no ImageNet concept channel in the checkpoint"
    )
    p.add_argument(
        "--concept-input",
        action="store_true",
        help="fast: the image tower also takes the concept vector as input (trained with it)",
    )
    p.add_argument(
        "--pseudo-captions",
        dest="pseudo_weight",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="fast: also train on pseudo-captions from the backbone's confident ImageNet labels, with "
        "this weight (0 = off)",
    )
    p.add_argument(
        "--fast-prior",
        action="store_true",
        help="slow: frozen Fast towers inside the model (score = Fast cosine + head, trained on out-of-fold "
        "priors); default: the cross-attention head alone, which re-ranks better (docs/slow.md)",
    )
    p.add_argument("--force", action="store_true", help="retrain even when the checkpoint exists (train all)")
    add_quiet(p)
    return p


def out_path(args, name: str) -> Path:
    return checkpoint_out(args.out, name)


def trainer(name: str):
    """The trainer of a named model; imported on use: each pulls in its own model and training stack."""
    module, fn = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def request(args, **changes) -> TrainRequest:
    """The typed request a trainer takes, from the parsed flags (the one place that reads them)."""
    names = {f.name for f in fields(TrainRequest)}
    return replace(TrainRequest(**{k: v for k, v in vars(args).items() if k in names}), **changes)


def run(args):
    if args.what != "all":
        if args.what == "fast" and args.distill:
            args.what = "fast-distilled"
            args.out = args.out or "fast-distilled"
        path = trainer(args.what)(request(args))
        print(f"saved {args.what} checkpoint to {path}")
        return 0
    for name in TRAINERS:
        if name not in NAMED_MODELS:
            continue
        if (default_checkpoint(name) / "model.safetensors").exists() and not args.force:
            print(f"{name}: already trained at {default_checkpoint(name)} (use --force to retrain)")
            continue
        t0 = time.time()
        path = trainer(name)(request(args, out=None))
        print(f"{name}: saved to {path} in {(time.time() - t0) / 60:.1f} min")
    return 0

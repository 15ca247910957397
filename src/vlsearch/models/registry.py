"""Named models: ``--model NAME`` resolves to that model's default checkpoint; a path is used as is."""

from __future__ import annotations

import importlib
from pathlib import Path

from vlsearch.config import file_sha1
from vlsearch.errors import CheckpointError
from vlsearch.models.checkpoint import WEIGHTS, load_checkpoint, read_meta
from vlsearch.settings import models_dir

# model_type (saved in every checkpoint) -> "module:Class"
MODEL_TYPES = {
    "fast": "vlsearch.models.fast:FastModel",
    "slow": "vlsearch.models.slow:SlowModel",
    "deformer": "vlsearch.models.deformer:DeformerModel",
}
# Named default models, trained by `make models` (`vlsearch train all`), and how each is trained.
NAMED_MODELS = {
    "fast": "vlsearch train fast",
    "slow": "vlsearch train slow",
    "fast-distilled": "vlsearch train fast --distill slow --out fast-distilled",
    "deformer-joint": "vlsearch train deformer-joint",
    "deformer": "vlsearch train deformer",
}


def model_class(model_type: str):
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model type {model_type!r} (known: {', '.join(MODEL_TYPES)})")
    module, cls = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module), cls)


def default_checkpoint(name: str) -> Path:
    return models_dir() / name


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A named model's default checkpoint folder, or an explicit checkpoint folder."""
    text = str(name_or_path)
    if text in NAMED_MODELS:
        path = default_checkpoint(text)
        if not (path / WEIGHTS).is_file():
            raise CheckpointError(
                f"model {text!r} is not trained yet (no checkpoint at {path}): run `{NAMED_MODELS[text]}` or `make models`"
            )
        return path
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{text!r} is neither a named model ({', '.join(NAMED_MODELS)}) nor an existing checkpoint folder"
        )
    return path


def load_model(name_or_path: str | Path):
    """(model, meta, path) for a named model or checkpoint folder, whatever its type."""
    path = resolve_checkpoint(name_or_path)
    meta = read_meta(path)
    model, meta = load_checkpoint(path, model_class(meta.get("model_type", "?")), meta.get("model_type"))
    return model, meta, path


def fingerprint(path: Path) -> str:
    """A short hash of a checkpoint's weights: indexes record it to detect a model swap."""
    return file_sha1(Path(path) / WEIGHTS)[:16]

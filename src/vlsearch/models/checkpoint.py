"""Checkpoints: safetensors weights + a JSON config of everything needed to rebuild the model.

A checkpoint is a folder written atomically (temp folder, then rename). Loading checks the format version
and the model type, so a checkpoint from an incompatible version or of another model fails clearly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlsearch.config import atomic_write_json, check_stamp, from_dict, stamp
from vlsearch.encoders.image import ImageBackboneConfig
from vlsearch.encoders.text import TextBackboneConfig
from vlsearch.errors import CheckpointError, VLSearchError

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_checkpoint(path: str | Path, model: torch.nn.Module, extra: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        meta = {
            **stamp(),
            "model_type": model.model_type,
            "config": dataclasses.asdict(model.config),
            # the cached backbone features it was trained from: their folder names say runtime and precision
            "features": {"image": ImageBackboneConfig().tag, "text": TextBackboneConfig().tag},
            **(extra or {}),
        }
        atomic_write_json(tmp / CONFIG, meta)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    cfg = path / CONFIG
    if not cfg.is_file():
        raise CheckpointError(
            f"no checkpoint at {path} (expected {CONFIG} and {WEIGHTS}); train one with `vlsearch train`"
        )
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint config {cfg} is corrupt: {e}") from e
    check_stamp(meta, "checkpoint", path, CheckpointError)
    return meta


def load_checkpoint(path: str | Path, model_cls, expected_type: str | None = None):
    """Rebuild ``model_cls`` from a checkpoint folder; returns (model, meta)."""
    path = Path(path)
    meta = read_meta(path)
    want = expected_type or model_cls.model_type
    if meta.get("model_type") != want:
        raise CheckpointError(f"checkpoint {path} holds a {meta.get('model_type')!r} model, not {want!r}")
    config_cls = model_cls.__init__.__annotations__.get("config")
    config_cls = _resolve_config_cls(model_cls, config_cls)
    try:
        config = from_dict(config_cls, meta["config"])
    except (VLSearchError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: config does not fit this version ({e})") from e
    model = model_cls(config, init_from_pretrained=False)
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint weights {path / WEIGHTS} are unreadable: {e}") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), meta


def _resolve_config_cls(model_cls, annotation):
    import sys
    import typing

    hints = typing.get_type_hints(model_cls.__init__, globalns=vars(sys.modules[model_cls.__module__]))
    return hints.get("config", annotation)

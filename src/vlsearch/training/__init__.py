"""Training loops (separate from the library, as open_clip_train is from open_clip)."""

from __future__ import annotations

from vlsearch.training.common import TrainRequest, apply_overrides

__all__ = ["TrainRequest", "apply_overrides"]

"""Turns images and texts into a dual encoder's embeddings, through the cached backbone features.

It lives under models/ (not search/) because index/ builds galleries with it and may only import downward."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlsearch.data.images import ImageReport, load_image
from vlsearch.encoders.features import FeatureExtractor, map_batches
from vlsearch.errors import QueryError
from vlsearch.precision import autocast, inference_copy
from vlsearch.settings import MAX_QUERY_CHARS


def check_query(text) -> str:
    """Reject what cannot be a text query, with a message the user can act on."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise QueryError("query is not valid UTF-8 text") from e
    if not isinstance(text, str):
        raise QueryError("query must be text")
    if "\x00" in text or any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise QueryError("query contains binary data")
    text = " ".join(text.split())
    if not text:
        raise QueryError("query is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}")
    return text


class Embedder:
    """A dual encoder (Fast or decomposed deformer) plus the feature cache it reads from."""

    def __init__(self, model, extractor: FeatureExtractor | None = None, progress: bool = True):
        self.model = inference_copy(model)
        self.extractor = extractor or FeatureExtractor(progress=progress)
        self.progress = progress

    @property
    def dim(self) -> int:
        return getattr(self.model, "output_dim", self.model.config.embed_dim)

    @torch.no_grad()
    def _image(self, grid: np.ndarray, mid: np.ndarray | None = None) -> np.ndarray:
        with autocast():
            g = torch.from_numpy(np.asarray(grid, dtype=np.float32))
            m = torch.from_numpy(np.asarray(mid, dtype=np.float32)) if mid is not None else None
            return self.model.encode_image(g, m).float().numpy()

    @torch.no_grad()
    def _text(self, states: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with autocast():
            s = torch.from_numpy(np.asarray(states, dtype=np.float32))
            return self.model.encode_text(s, torch.from_numpy(np.asarray(lengths))).float().numpy()

    def embed_keys(self, keys: list[str], batch: int = 512) -> np.ndarray:
        """Embeddings of cached images by content key."""
        store = self.extractor.images
        if not keys:
            return np.zeros((0, self.dim), np.float32)
        parts = map_batches(
            lambda s, e: self._image(
                store.get_stacked(keys[s:e], "grid"), store.get_stacked(keys[s:e], "mid")
            ),
            len(keys),
            batch,
            "embed images",
            self.progress and len(keys) > batch,
        )
        return np.concatenate(parts)

    def embed_paths(
        self, paths: Sequence[str | Path], report: ImageReport | None = None
    ) -> tuple[np.ndarray, list[str | None]]:
        """(embeddings of the readable images, content key per path or None if unreadable)."""
        feats = self.extractor.image_keys(paths, report)
        keys = [k for k in feats.keys if k is not None]
        return self.embed_keys(keys), feats.keys

    def embed_image(self, image) -> np.ndarray:
        """One query image (path, bytes or PIL) -> [D]. Raises QueryError when it is not an image."""
        try:
            arr = load_image(image, self.extractor.image_config.image_size)
        except ValueError as e:
            raise QueryError(str(e)) from e
        out = self.extractor.encode_image_arrays([arr])
        return self._image(out["grid"], out["mid"])[0]

    def embed_texts(self, texts: list[str], cached: bool = True, batch: int = 1024) -> np.ndarray:
        """Captions (cached: dataset text) or queries (uncached) -> [N, D]."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if not cached:
            states, lengths, _ = self.extractor.encode_texts([check_query(t) for t in texts])
            return self._text(states, lengths)
        keys = self.extractor.text_keys(texts)
        store = self.extractor.texts

        def run(s, e):
            states, lengths = store.get_padded(keys[s:e], "states")
            return self._text(states, lengths)

        return np.concatenate(
            map_batches(run, len(keys), batch, "embed texts", self.progress and len(keys) > batch)
        )

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_texts([text], cached=False)[0]

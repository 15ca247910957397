"""Backbone features, computed once per (backbone, image content | caption text) and cached on disk.

Everything downstream (training, indexing, evaluation) asks for features through here, so a second run
reads them from the cache instead of recomputing them.
"""

from __future__ import annotations

import hashlib
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlsearch.config import file_sha1
from vlsearch.data.images import ImageReport, load_image
from vlsearch.data.photo import decode_variant
from vlsearch.data.safe_decode import open_header
from vlsearch.encoders.image import ImageBackbone, ImageBackboneConfig
from vlsearch.encoders.store import TokenStore
from vlsearch.encoders.text import TextBackbone, TextBackboneConfig
from vlsearch.precision import use_bf16
from vlsearch.settings import cache_dir

CHUNK = 512
# Images per backbone call while indexing: the graph runtimes run micro-batches of 4 (encoders/runtime.py),
# so 8 is as fast per image as 64, and the backbone's first call waits for 8 decodes, not a whole batch.
# On the bench's 48 12-megapixel JPEGs (`photos_decode`, run alone) that took 87.5 to 90.4 images/s.
MODEL_BATCH = 8


def file_key(path: str | Path) -> str:
    return file_sha1(path)


def photo_key(path: str | Path, size: int) -> str:
    """The cache key of an image file: its content hash, salted for the few files (rotated, large JPEG,
    transparent) whose pixels ``load_image`` now decodes differently than before, so their old cached
    features are not reused and every other cached entry stays valid."""
    key = file_key(path)
    try:
        with open_header(path) as img:  # header only, allowed formats
            variant = decode_variant(img, size)
    except Exception:  # noqa: BLE001 - unreadable files are reported when decoded
        variant = ""
    return hashlib.sha1(f"{key}|{variant}".encode()).hexdigest() if variant else key


def bytes_key(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def image_store(config: ImageBackboneConfig = ImageBackboneConfig(), root: Path | None = None) -> TokenStore:
    mid_dim = {"efficientnet-lite0": 112, "efficientnet-lite1": 112, "efficientnet-lite2": 120}[config.name]
    return TokenStore(
        (root or cache_dir()) / "image" / config.tag,
        {"grid": (1280, "float16"), "mid": (mid_dim, "float16")},
        {
            "backbone": config.name,
            "image_size": config.image_size,
            "mid_block": config.mid_block,
            "bf16": config.bf16 and use_bf16(),
        },
    )


def text_store(config: TextBackboneConfig = TextBackboneConfig(), root: Path | None = None) -> TokenStore:
    return TokenStore(
        (root or cache_dir()) / "text" / config.tag,
        {"states": (384, "float16"), "ids": (1, "int32")},
        {
            "backbone": config.name,
            "split_layer": config.split_layer,
            "max_tokens": config.max_tokens,
            "bf16": config.bf16 and use_bf16(),
        },
    )


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(
        total=total,
        desc=desc,
        unit="img" if "image" in desc else "txt",
        disable=not enabled or total == 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )


@dataclass
class ImageFeatures:
    """Keys (content hashes) per input path; None where the image was unreadable."""

    keys: list[str | None]
    report: ImageReport

    @property
    def ok(self) -> np.ndarray:
        return np.array([k is not None for k in self.keys], dtype=bool)


class FeatureExtractor:
    """Fills the caches. Backbones load lazily: a fully cached run never builds them."""

    def __init__(
        self,
        image_config: ImageBackboneConfig = ImageBackboneConfig(),
        text_config: TextBackboneConfig = TextBackboneConfig(),
        root: Path | None = None,
        progress: bool = True,
        batch_size: int = 64,
        decode_threads: int = 2,
    ):
        self.image_config, self.text_config = image_config, text_config
        self.images = image_store(image_config, root)
        self.texts = text_store(text_config, root)
        self.progress = progress
        self.batch_size = batch_size
        self.decode_threads = decode_threads
        self._image_backbone: ImageBackbone | None = None
        self._text_backbone: TextBackbone | None = None

    @property
    def image_backbone(self) -> ImageBackbone:
        if self._image_backbone is None:
            self._image_backbone = ImageBackbone(self.image_config)
        return self._image_backbone

    @property
    def text_backbone(self) -> TextBackbone:
        if self._text_backbone is None:
            self._text_backbone = TextBackbone(self.text_config)
        return self._text_backbone

    # -- images -------------------------------------------------------------------------------------------
    def image_keys(self, paths: Sequence[str | Path], report: ImageReport | None = None) -> ImageFeatures:
        """Hash files, extract features for the ones not cached yet, return their keys."""
        report = report if report is not None else ImageReport()
        size = self.image_config.image_size

        def key(p):
            try:
                return photo_key(p, size), None
            except OSError as e:
                return None, f"cannot read file ({e.strerror or e})"

        keys: list[str | None] = []
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:  # sha1 releases the GIL
            for p, (k, err) in zip(paths, pool.map(key, paths), strict=True):
                if err:
                    report.add(p, err)
                keys.append(k)
        todo: dict[str, Path] = {}
        missing = set(self.images.missing([k for k in keys if k]))
        for k, p in zip(keys, paths, strict=True):
            if k in missing and k not in todo:
                todo[k] = Path(p)
        bad = self._extract_images(list(todo.items()), report)
        keys = [None if k in bad else k for k in keys]
        return ImageFeatures(keys, report)

    def _extract_images(self, items: list[tuple[str, Path]], report: ImageReport) -> set[str]:
        bad: set[str] = set()
        if not items:
            return bad
        size = self.image_config.image_size

        def decode(item):
            key, path = item
            try:
                return key, load_image(path, size), None
            except ValueError as e:
                return key, None, str(e)

        path_of = dict(items)
        bar = _progress(len(items), "image features", self.progress)
        pending_keys: list[str] = []
        pending: dict[str, list[np.ndarray]] = {"grid": [], "mid": []}
        todo = iter(items)
        in_flight: deque = deque()
        # A pipeline: decode threads keep up to two batches of images decoding ahead, and the backbone
        # takes them MODEL_BATCH at a time, so it starts after the first few decodes, not a whole batch.
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:

            def top_up() -> None:
                for item in islice(todo, max(0, 2 * self.batch_size - len(in_flight))):
                    in_flight.append(pool.submit(decode, item))

            top_up()
            while in_flight:
                decoded = [in_flight.popleft().result() for _ in range(min(MODEL_BATCH, len(in_flight)))]
                top_up()
                good = [(k, a) for k, a, err in decoded if err is None]
                for k, _, err in decoded:
                    if err is not None:
                        bad.add(k)
                        report.add(path_of[k], err)
                if good:
                    out = self.image_backbone.encode_numpy(np.stack([a for _, a in good]))
                    pending_keys += [k for k, _ in good]
                    for name in pending:
                        pending[name] += list(out[name])
                if len(pending_keys) >= CHUNK or not in_flight:
                    self.images.put(pending_keys, pending)
                    pending_keys, pending = [], {"grid": [], "mid": []}
                bar.update(len(decoded))
        bar.close()
        return bad

    def encode_image_arrays(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Uncached features for already decoded images (query images, uploads)."""
        return self.image_backbone.encode_numpy(np.stack(arrays))

    # -- texts --------------------------------------------------------------------------------------------
    def text_keys(self, texts: Sequence[str]) -> list[str]:
        keys = [text_key(t) for t in texts]
        missing = set(self.texts.missing(keys))
        todo = list({k: t for k, t in zip(keys, texts, strict=True) if k in missing}.items())
        if todo:
            todo.sort(key=lambda kt: len(kt[1]))  # similar lengths batch with little padding
            bar = _progress(len(todo), "text features", self.progress)
            bs = self.batch_size * 4
            for start in range(0, len(todo), CHUNK):
                part = todo[start : start + CHUNK]
                states, ids = [], []
                for b in range(0, len(part), bs):
                    s, i = self.text_backbone.encode([t for _, t in part[b : b + bs]])
                    states += s
                    ids += [x[:, None] for x in i]
                    bar.update(len(part[b : b + bs]))
                self.texts.put([k for k, _ in part], {"states": states, "ids": ids})
            bar.close()
        return keys

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Uncached token states for queries: (states [B,L,384], lengths [B], ids [B,L])."""
        states, ids = self.text_backbone.encode(texts)
        return pad(states), np.array([len(s) for s in states]), pad([i[:, None] for i in ids])[..., 0]


def pad(items: list[np.ndarray]) -> np.ndarray:
    L = max(len(a) for a in items)
    out = np.zeros((len(items), L, *items[0].shape[1:]), dtype=items[0].dtype)
    for i, a in enumerate(items):
        out[i, : len(a)] = a
    return out


def map_batches(fn: Callable, n: int, batch_size: int, desc: str, progress: bool = True) -> list:
    """Run fn(start, stop) over [0, n) in batches with a progress bar; return the list of results."""
    out = []
    bar = tqdm(total=n, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for s in range(0, n, batch_size):
        out.append(fn(s, min(n, s + batch_size)))
        bar.update(min(n, s + batch_size) - s)
    bar.close()
    return out

"""A segmented index read as one: immutable gallery segments plus the manifest's tombstones.

The layout and the write rules are in index/manifest.py. Global image rows number the segments' rows
one segment after the other, in the manifest's order, deleted rows included (they keep their number
until ``vlsearch index --compact``), so rows stay stable between compactions. A query asks every segment
for its top k plus its deleted count (threads: faiss releases the GIL), drops deleted rows and merges
by score. ``GalleryIndex.open`` opens this layout (and the old ``sharded`` one of `index --ray`, the
same folders without tombstones), so ``vlsearch.load``, ``search`` and ``serve`` need nothing else.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlsearch.config import from_dict
from vlsearch.errors import IndexError_
from vlsearch.index.manifest import Manifest, manifest_of
from vlsearch.index.plain import ImageRecord, IndexConfig, PlainIndex, read_records


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], offsets: list[int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-segment (scores [Q,k_i], rows [Q,k_i]) -> global (scores [Q,<=k], rows [Q,<=k]), best first."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    rows = np.concatenate(
        [np.where(r >= 0, r + off, -1) for (_, r), off in zip(parts, offsets, strict=True)], axis=1
    )
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)


def _drop_dead(scores: np.ndarray, rows: np.ndarray, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(dead):
        gone = np.isin(rows, dead)
        rows = np.where(gone, -1, rows)
        scores = np.where(gone, -np.inf, scores).astype(np.float32)
    return scores, rows


_POOL: list[ThreadPoolExecutor] = []


def _shared_pool() -> ThreadPoolExecutor:
    """One pool for every open index: a service reopening its index on each write starts no threads."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=4, thread_name_prefix="segments"))
    return _POOL[0]


def _captions_of(segment: PlainIndex, image_rows: np.ndarray) -> np.ndarray:
    """Local caption rows of the given local image rows of one segment (indexed by image_row in indexes
    built since session 11; a scan per 500 rows in older ones)."""
    if not len(image_rows):
        return np.zeros(0, np.int64)
    out: list[int] = []
    rows = [int(r) for r in image_rows]
    for i in range(0, len(rows), 500):
        part = rows[i : i + 500]
        q = f"SELECT row FROM captions WHERE image_row IN ({','.join('?' * len(part))}) ORDER BY row"
        out += [r for (r,) in segment._db.execute(q, part)]
    return np.asarray(sorted(out), np.int64)


def load_config(manifest: Manifest) -> IndexConfig:
    return from_dict(IndexConfig, manifest.config)


class SegmentVectors:
    """The ``VectorIndex`` interface (search, len, dim, configure) over the segments' vector indexes;
    ``len`` counts live rows."""

    kind = "segments"

    def __init__(self, parts: list, offsets: list[int], dead: list[np.ndarray] | None = None):
        self.parts, self.offsets = parts, offsets
        self.dead = dead or [np.zeros(0, np.int64) for _ in parts]
        self._pool = _shared_pool() if len(parts) > 1 else None

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    def __len__(self) -> int:
        return sum(len(p) - len(d) for p, d in zip(self.parts, self.dead, strict=True))

    def _search_part(self, i: int, queries: np.ndarray, k: int):
        part, dead = self.parts[i], self.dead[i]
        scores, rows = part.search(queries, k + len(dead))
        return _drop_dead(scores, rows, dead)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(int(k), max(len(self), 1)))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        live = [i for i, (p, d) in enumerate(zip(self.parts, self.dead, strict=True)) if len(p) > len(d)]
        if not live:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self._pool is None or len(live) == 1:
            parts = [self._search_part(i, queries, k) for i in live]
        else:
            parts = list(self._pool.map(lambda i: self._search_part(i, queries, k), live))
        return merge_topk(parts, [self.offsets[i] for i in live], k)

    def configure(self, **params) -> None:
        for p in self.parts:
            p.configure(**params)

    def reconstruct_all(self) -> np.ndarray:
        """All rows, deleted ones too (``deleted`` lists those)."""
        return np.concatenate([p.reconstruct_all() for p in self.parts])

    def deleted(self) -> np.ndarray:
        parts = [d + off for d, off in zip(self.dead, self.offsets, strict=True)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class SegmentEmbeddings:
    """The segments' memory-mapped fp16 embeddings seen as one [N, D] array (all rows, deleted ones too;
    rows and slices, no copy of all)."""

    def __init__(self, shards: list[PlainIndex], offsets: list[int]):
        self.shards, self.offsets = shards, np.asarray(offsets + [offsets[-1] + len(shards[-1].images)])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.offsets[-1]), self.shards[0].config.dim)

    @property
    def dtype(self):
        return np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, int | np.integer):
            s = int(np.searchsorted(self.offsets, rows, side="right") - 1)
            return self.shards[s].embeddings[rows - self.offsets[s]]
        idx = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(idx), self.shape[1]), np.float16)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s].embeddings[idx[sel] - self.offsets[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(s.embeddings) for s in self.shards])
        return out.astype(dtype) if dtype is not None else out


class SegmentedIndex:
    """What ``GalleryIndex`` offers (images, captions, records, embeddings...) over a segmented folder."""

    is_sharded = True  # older name, kept for callers that ask

    def __init__(self, path: Path, manifest: Manifest, shards: list[PlainIndex]):
        if not shards:
            raise IndexError_(f"segmented index at {path} lists no segments; rebuild it")
        self.path, self.manifest, self.shards = Path(path), manifest, shards
        self.config = load_config(manifest)
        self.shard_names = self.segment_names = list(manifest.segments)
        self.offsets = [0]
        self.caption_offsets = [0]
        for s in shards[:-1]:
            self.offsets.append(self.offsets[-1] + len(s.images))
            self.caption_offsets.append(self.caption_offsets[-1] + (len(s.captions) if s.captions else 0))
        self.dead_local = [np.asarray(manifest.dead(n), np.int64) for n in self.shard_names]
        self.dead = np.concatenate([d + off for d, off in zip(self.dead_local, self.offsets, strict=True)])
        self.images = SegmentVectors([s.images for s in shards], self.offsets, self.dead_local)
        # a deleted image's captions go with it (image-to-text, video-to-text) until compaction drops them
        with_caps = [
            (s.captions, off, _captions_of(s, dead))
            for s, off, dead in zip(shards, self.caption_offsets, self.dead_local, strict=True)
            if s.captions
        ]
        self.captions = SegmentVectors(*map(list, zip(*with_caps, strict=True))) if with_caps else None
        self.n_caption_rows = sum(len(s.captions) for s in shards if s.captions)
        self._embeddings = SegmentEmbeddings(shards, self.offsets)
        self.has_video_columns = all(s.has_video_columns for s in shards)

    @classmethod
    def open(cls, path: str | Path, meta: dict) -> SegmentedIndex:
        path = Path(path)
        manifest = manifest_of(meta)
        config = load_config(manifest)
        shards = []
        for name in manifest.segments:
            seg = path / name
            if not (seg / "config.json").is_file():
                raise IndexError_(f"segment {name} of the index at {path} is missing; rebuild the index")
            shard = PlainIndex.open(seg)
            if shard.config.model_fingerprint != config.model_fingerprint:
                raise IndexError_(f"segment {name} of {path} was built with another model; rebuild the index")
            shards.append(shard)
        index = cls(path, manifest, shards)
        if len(index.images) != config.n_images:
            raise IndexError_(
                f"segmented index at {path} is inconsistent ({len(index.images)} live vectors in its "
                f"segments, {config.n_images} images in its manifest); rebuild it"
            )
        return index

    def check_integrity(self) -> None:
        for s in self.shards:
            s.check_integrity()

    @property
    def n_rows(self) -> int:
        """All rows, deleted ones included (the range of row numbers)."""
        return len(self._embeddings)

    def is_live(self, row: int) -> bool:
        return 0 <= row < self.n_rows and not (len(self.dead) and bool(np.isin(row, self.dead)))

    # -- rows <-> segments --------------------------------------------------------------------------------
    def _split(self, rows, offsets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray([int(r) for r in rows], dtype=np.int64)
        which = np.searchsorted(np.asarray(offsets), rows, side="right") - 1
        return rows, which

    def records(self, rows) -> list[ImageRecord]:
        rows, which = self._split(rows, self.offsets)
        out: list[ImageRecord | None] = [None] * len(rows)
        for s in np.unique(which):
            sel = np.flatnonzero(which == s)
            for i, rec in zip(sel, self.shards[s].records(rows[sel] - self.offsets[s]), strict=True):
                out[i] = rec
        return out  # type: ignore[return-value]

    def record(self, row: int) -> ImageRecord | None:
        """The record of a live row; None for a deleted one (GET /images/ROW then answers 404)."""
        return self.records([row])[0] if self.is_live(int(row)) else None

    def row_of_id(self, image_id: str) -> int | None:
        """The live row of an id (the newest segment first: a re-added id lives there)."""
        for shard, off, dead in reversed(list(zip(self.shards, self.offsets, self.dead_local, strict=True))):
            row = shard.row_of_id(image_id)
            if row is not None and row not in dead:
                return off + row
        return None

    def paths_of_keys(self, keys) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.shards:
            out.update(s.paths_of_keys(keys))
        return out

    def caption_rows(self, rows) -> list[tuple[str, int]]:
        rows, which = self._split(rows, self.caption_offsets)
        out: list = [None] * len(rows)
        for s in np.unique(which):
            sel = np.flatnonzero(which == s)
            caps = self.shards[s].caption_rows(rows[sel] - self.caption_offsets[s])
            for i, (text, img) in zip(sel, caps, strict=True):
                out[i] = (text, img + self.offsets[s])
        return out

    def filter_rows(self, f) -> np.ndarray:
        """Live rows passing the photo filters, over all segments (sorted)."""
        parts = [
            np.setdiff1d(s.filter_rows(f), d, assume_unique=True) + off
            for s, off, d in zip(self.shards, self.offsets, self.dead_local, strict=True)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def photos(self, rows) -> dict:
        rows, which = self._split(rows, self.offsets)
        out = {}
        for s in np.unique(which):
            sel = rows[which == s]
            found = self.shards[s].photos(sel - self.offsets[s])
            out.update({int(r) + self.offsets[s]: m for r, m in found.items()})
        return out

    @property
    def embeddings(self) -> SegmentEmbeddings:
        return self._embeddings

    def live_rows(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.n_rows), self.dead, assume_unique=True)

    def all_keys(self) -> list[str]:
        return [r.key for r in self.all_records()]

    def rows_and_records(self) -> list[tuple[int, ImageRecord]]:
        """(global row, record) of every live row, in row order."""
        out = []
        for s, off, dead in zip(self.shards, self.offsets, self.dead_local, strict=True):
            gone = set(dead.tolist())
            out += [(off + r, rec) for r, rec in enumerate(read_records(s)) if r not in gone]
        return out

    def all_records(self) -> list[ImageRecord]:
        """The live records, in row order."""
        return [rec for _, rec in self.rows_and_records()]

    def close(self) -> None:
        for s in self.shards:
            s.close()

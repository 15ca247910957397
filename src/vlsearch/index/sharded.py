"""A gallery split into shards (each a normal gallery index folder) that is searched as one.

Layout of a sharded index folder (written by ``vlsearch index --ray``, see docs/scaling.md)::

    config.json        {"layout": "sharded", "shards": ["shard-00000", ...], "config": IndexConfig}
    shard-00000/       a complete gallery index (config.json, images.faiss, meta.sqlite, embeddings.npy)
    shard-00001/
    ...

Global image rows number the shards' rows one shard after the other, in the order ``shards`` lists them,
so a sharded index over a folder has the same rows as a single index over it. A query asks every shard
for its top-k (in parallel threads: faiss releases the GIL) and merges them by score.
``GalleryIndex.open`` opens this layout too, so ``vlsearch.load``, ``search`` and ``serve`` need nothing else.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vlsearch.config import atomic_write_json, from_dict, stamp
from vlsearch.errors import IndexError_
from vlsearch.index.gallery import GalleryIndex, ImageRecord, IndexConfig

LAYOUT = "sharded"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def write_sharded_config(path: Path, config: IndexConfig, shards: list[str]) -> None:
    """The top-level config.json that makes ``path`` (holding the shard folders) one index."""
    atomic_write_json(
        Path(path) / "config.json",
        {**stamp(), "layout": LAYOUT, "shards": list(shards), "config": asdict(config)},
    )


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], offsets: list[int], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (scores [Q,k_i], rows [Q,k_i]) -> global (scores [Q,<=k], rows [Q,<=k]), best first."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    rows = np.concatenate(
        [np.where(r >= 0, r + off, -1) for (_, r), off in zip(parts, offsets, strict=True)], axis=1
    )
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)


class ShardedVectors:
    """The ``VectorIndex`` interface (search, len, dim, configure) over several shards' vector indexes."""

    kind = LAYOUT

    def __init__(self, parts: list, offsets: list[int]):
        self.parts, self.offsets = parts, offsets
        self._pool = ThreadPoolExecutor(max_workers=min(len(parts), 8)) if len(parts) > 1 else None

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(int(k), len(self)))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        live = [(p, off) for p, off in zip(self.parts, self.offsets, strict=True) if len(p)]
        if self._pool is None or len(live) == 1:
            parts = [p.search(queries, k) for p, _ in live]
        else:
            parts = list(self._pool.map(lambda p: p.search(queries, k), [p for p, _ in live]))
        return merge_topk(parts, [off for _, off in live], k)

    def configure(self, **params) -> None:
        for p in self.parts:
            p.configure(**params)

    def reconstruct_all(self) -> np.ndarray:
        return np.concatenate([p.index.reconstruct_n(0, len(p)) for p in self.parts])


class ShardedEmbeddings:
    """The shards' memory-mapped fp16 embeddings seen as one [N, D] array (rows and slices, no copy of all)."""

    def __init__(self, shards: list[GalleryIndex], offsets: list[int]):
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


class ShardedIndex:
    """What ``GalleryIndex`` offers (images, captions, records, embeddings...) over a sharded folder."""

    is_sharded = True

    def __init__(self, path: Path, config: IndexConfig, shard_names: list[str], shards: list[GalleryIndex]):
        if not shards:
            raise IndexError_(f"sharded index at {path} lists no shards; rebuild it")
        self.path, self.config, self.shard_names, self.shards = Path(path), config, shard_names, shards
        self.offsets = [0]
        self.caption_offsets = [0]
        for s in shards[:-1]:
            self.offsets.append(self.offsets[-1] + len(s.images))
            self.caption_offsets.append(self.caption_offsets[-1] + (len(s.captions) if s.captions else 0))
        self.images = ShardedVectors([s.images for s in shards], self.offsets)
        with_caps = [
            (s.captions, off) for s, off in zip(shards, self.caption_offsets, strict=True) if s.captions
        ]
        self.captions = ShardedVectors(*map(list, zip(*with_caps, strict=True))) if with_caps else None
        self._embeddings = ShardedEmbeddings(shards, self.offsets)

    @classmethod
    def open(cls, path: str | Path, meta: dict) -> ShardedIndex:
        path = Path(path)
        config = from_dict(IndexConfig, meta["config"])
        names = list(meta.get("shards", []))
        shards = []
        for name in names:
            shard = GalleryIndex.open(path / name)
            if shard.config.model_fingerprint != config.model_fingerprint:
                raise IndexError_(f"shard {name} of {path} was built with another model; rebuild the index")
            shards.append(shard)
        index = cls(path, config, names, shards)
        if len(index.images) != config.n_images:
            raise IndexError_(
                f"sharded index at {path} is inconsistent ({len(index.images)} vectors in its shards, "
                f"{config.n_images} images in its config); rebuild it"
            )
        return index

    # -- rows <-> shards ----------------------------------------------------------------------------------
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

    def record(self, row: int) -> ImageRecord:
        return self.records([row])[0]

    def row_of_id(self, image_id: str) -> int | None:
        for shard, off in zip(self.shards, self.offsets, strict=True):
            row = shard.row_of_id(image_id)
            if row is not None:
                return off + row
        return None

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
        """Rows passing the photo filters, over all shards (sorted)."""
        parts = [s.filter_rows(f) + off for s, off in zip(self.shards, self.offsets, strict=True)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def photos(self, rows) -> dict:
        rows, which = self._split(rows, self.offsets)
        out = {}
        for s in np.unique(which):
            sel = rows[which == s]
            found = self.shards[s].photos(sel - self.offsets[s])
            out.update({int(r) + self.offsets[s]: m for r, m in found.items()})
        return out

    @property
    def embeddings(self) -> ShardedEmbeddings:
        return self._embeddings

    def all_keys(self) -> list[str]:
        return [k for s in self.shards for k in s.all_keys()]

    def all_records(self) -> list[ImageRecord]:
        from vlsearch.index.gallery import read_records

        return [r for s in self.shards for r in read_records(s)]

    def close(self) -> None:
        for s in self.shards:
            s.close()

    # -- growing: new images go into a new shard ---------------------------------------------------------
    def add_images(self, items, progress: bool = True):
        """Embed new images (a folder or files) into one new shard; returns (n added, ImageReport)."""
        from vlsearch.index.build import checked_model, embed_new_images, not_yet_in, photos_of
        from vlsearch.index.gallery import GalleryIndex, write_gallery, write_lock

        have = {r.path for r in self.all_records()}
        new, emb, report = embed_new_images(checked_model(self), items, have, progress)
        if new:
            with write_lock(self.path):  # another writer may have added a shard since this one opened
                current = GalleryIndex.open(self.path)
                new, emb = not_yet_in(new, emb, {r.path for r in current.all_records()})
                current.close()
                if new:
                    name = shard_name(max(int(n.split("-")[-1]) for n in current.shard_names) + 1)
                    shard_cfg = IndexConfig(
                        **{**asdict(current.config), "kind": "auto", "n_images": 0, "n_captions": 0}
                    )
                    write_gallery(self.path / name, shard_cfg, new, emb, photos=photos_of(new))
                    config = IndexConfig(
                        **{**asdict(current.config), "n_images": current.config.n_images + len(new)}
                    )
                    write_sharded_config(self.path, config, current.shard_names + [name])
        if report:
            print(report.summary(), file=sys.stderr)
        return len(new), report

"""The on-disk gallery index: image vectors (faiss), optional caption vectors, and SQLite metadata.

Layout of an index folder::

    config.json      how it was made: vlsearch version, model name + weights fingerprint, kinds, sizes
    images.faiss     image embeddings
    captions.faiss   caption embeddings (dataset galleries only), for image-to-text search
    meta.sqlite      images(row, id, path, key) and captions(row, text, image_row)
    embeddings.npy   image embeddings, fp16, memory-mapped (rebuilds, image-to-image, exact re-check)

Every write builds a complete new folder beside the old one and swaps it in with renames, so a reader
or a killed writer never sees a half-written index. Writers that read the index first (``--add``, the
service's POST /images) hold ``write_lock`` from that read to the swap, so concurrent adds lose nothing.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlsearch.config import atomic_write_json, check_stamp, from_dict, stamp
from vlsearch.errors import IndexError_
from vlsearch.index.vectors import VectorIndex, make_vector_index, read_vector_index


@dataclass
class IndexConfig:
    model: str  # named model or checkpoint path it was built with
    model_type: str
    model_fingerprint: str
    dim: int
    kind: str
    image_backbone: str
    text_backbone: str
    n_images: int = 0
    n_captions: int = 0
    source: str = ""
    created: float = field(default_factory=time.time)
    concepts: bool = True  # the model's concept channel in the vectors (False: built with --no-concepts)


@dataclass
class ImageRecord:
    id: str
    path: str
    key: str


class GalleryIndex:
    def __init__(self, path: Path, config: IndexConfig, images: VectorIndex, captions: VectorIndex | None):
        self.path, self.config, self.images, self.captions = Path(path), config, images, captions
        self._db = sqlite3.connect(
            f"file:{self.path / 'meta.sqlite'}?mode=ro", uri=True, check_same_thread=False
        )
        self._embeddings: np.ndarray | None = None

    # -- reading --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> GalleryIndex:
        path = Path(path)
        cfg = path / "config.json"
        if not cfg.is_file():
            raise IndexError_(f"no index at {path}: build one with `vlsearch index`")
        try:
            meta = json.loads(cfg.read_text())
            check_stamp(meta, "index", path, IndexError_)
            if meta.get("layout") == "sharded":  # a folder of gallery shards searched as one
                from vlsearch.index.sharded import ShardedIndex

                return ShardedIndex.open(path, meta)
            config = from_dict(IndexConfig, meta["config"])
            images = read_vector_index(path / "images.faiss", config.kind)
            captions = (
                read_vector_index(path / "captions.faiss", "flat")
                if (path / "captions.faiss").exists()
                else None
            )
            index = cls(path, config, images, captions)
            images.attach_vectors(index.embeddings)  # IVF-PQ re-checks its candidates against them
        except IndexError_:
            raise
        except Exception as e:  # faiss raises RuntimeError, json ValueError, sqlite its own: all mean corrupt
            raise IndexError_(
                f"index at {path} is corrupt or incomplete ({type(e).__name__}: {e}); rebuild it with `vlsearch index`"
            ) from e
        if len(images) != config.n_images:
            raise IndexError_(
                f"index at {path} is inconsistent ({len(images)} vectors, {config.n_images} images); rebuild it"
            )
        return index

    def records(self, rows) -> list[ImageRecord]:
        rows = [int(r) for r in rows]
        if not rows:
            return []
        q = f"SELECT row, id, path, key FROM images WHERE row IN ({','.join('?' * len(rows))})"
        found = {r: ImageRecord(i, p, k) for r, i, p, k in self._db.execute(q, rows)}
        return [found[r] for r in rows]

    def record(self, row: int) -> ImageRecord:
        recs = self.records([row])
        return recs[0]

    def row_of_id(self, image_id: str) -> int | None:
        hit = self._db.execute("SELECT row FROM images WHERE id = ?", (image_id,)).fetchone()
        return hit[0] if hit else None

    def caption_rows(self, rows) -> list[tuple[str, int]]:
        rows = [int(r) for r in rows]
        if not rows:
            return []
        q = f"SELECT row, text, image_row FROM captions WHERE row IN ({','.join('?' * len(rows))})"
        found = {r: (t, i) for r, t, i in self._db.execute(q, rows)}
        return [found[r] for r in rows]

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = np.load(self.path / "embeddings.npy", mmap_mode="r")
        return self._embeddings

    def all_keys(self) -> list[str]:
        return [k for (k,) in self._db.execute("SELECT key FROM images ORDER BY row")]

    def close(self) -> None:
        self._db.close()


def write_gallery(
    path: str | Path,
    config: IndexConfig,
    records: list[ImageRecord],
    embeddings: np.ndarray,
    captions: list[tuple[str, int]] | None = None,
    caption_embeddings: np.ndarray | None = None,
) -> Path:
    """Build a complete index folder in a temp folder and swap it in atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        config.n_images, config.dim = len(records), embeddings.shape[1]
        vi = make_vector_index(config.dim, len(records), config.kind)
        config.kind = vi.kind
        vi.add(embeddings)
        vi.write(tmp / "images.faiss")
        np.save(tmp / "embeddings.npy", embeddings.astype(np.float16))
        db = sqlite3.connect(tmp / "meta.sqlite")
        db.execute("CREATE TABLE images (row INTEGER PRIMARY KEY, id TEXT, path TEXT, key TEXT)")
        db.execute("CREATE INDEX images_id ON images(id)")
        db.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?)",
            [(r, x.id, x.path, x.key) for r, x in enumerate(records)],
        )
        db.execute("CREATE TABLE captions (row INTEGER PRIMARY KEY, text TEXT, image_row INTEGER)")
        if captions:
            db.executemany(
                "INSERT INTO captions VALUES (?, ?, ?)", [(r, t, i) for r, (t, i) in enumerate(captions)]
            )
            cv = make_vector_index(config.dim, len(captions), "flat")
            cv.add(caption_embeddings)
            cv.write(tmp / "captions.faiss")
            config.n_captions = len(captions)
        db.commit()
        db.close()
        atomic_write_json(tmp / "config.json", {**stamp(), "config": asdict(config)})
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@contextmanager
def write_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on one index across processes and threads (flock on a sibling lock file), for
    read-modify-write updates: without it two adds that read the same index would each drop the other's
    images when they swap in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def swap_in(new: Path, path: Path) -> None:
    """Replace ``path`` by the complete folder ``new`` (two renames; the old one is removed after)."""
    old = path.with_name(f".{path.name}.old-{int(time.time() * 1e6)}")
    if path.exists():
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def read_captions(index: GalleryIndex) -> list[tuple[str, int]]:
    return [(t, i) for t, i in index._db.execute("SELECT text, image_row FROM captions ORDER BY row")]


def read_records(index: GalleryIndex) -> list[ImageRecord]:
    return [
        ImageRecord(i, p, k) for i, p, k in index._db.execute("SELECT id, path, key FROM images ORDER BY row")
    ]

"""A plain (one-folder) gallery index: image vectors (faiss), optional caption vectors, SQLite metadata.

Layout of an index folder::

    config.json      how it was made: vlsearch version, model name + weights fingerprint, kinds, sizes
    images.faiss     image embeddings
    captions.faiss   caption embeddings (dataset galleries only), for image-to-text search
    meta.sqlite      images(row, id, path, key), captions(row, text, image_row) and photos(row, taken,
                     camera, GPS, folder, size...: index/photos.py; absent in older indexes)
    embeddings.npy   image embeddings, fp16, memory-mapped (rebuilds, image-to-image, exact re-check)

Every write builds a complete new folder beside the old one and swaps it in with renames, so a reader
or a killed writer never sees a half-written index. Writers that read the index first (``--add``, the
service's POST /images) hold ``write_lock`` from that read to the swap, so concurrent adds lose nothing.

A segment of a segmented index (index/segments.py) is such a folder, so this module sits below segments;
``GalleryIndex`` (index/gallery.py), above both, opens either layout.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlsearch.config import atomic_write_json, check_stamp, from_dict, stamp
from vlsearch.data.metadata import PhotoMeta
from vlsearch.errors import IndexError_
from vlsearch.index import photos as P
from vlsearch.index.manifest import fault_point, fsync_dir, fsync_tree
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
    hubness: bool = True  # the model's hubness prior column in the vectors (False: built with --no-hubness)
    roots: list[str] = field(default_factory=list)  # folders the files lie in: the service serves only these
    follow_symlinks: bool = False  # built with --follow-symlinks: links out of the roots were indexed


DEFAULT_SOURCE = "default data root"  # what ``source`` says when no folder was given


def index_roots(config) -> list[str]:
    """The folders an index's files lie in (the service serves files inside these only). An index from
    before roots were recorded (a ``--ray`` build until now, or older) gets the folder it was built from,
    as its ``source`` names it: an absolute folder, or the default data root. Its rows' own paths are
    not trusted for this (a dataset JSON may have named files anywhere). [] when neither is known."""
    roots = list(getattr(config, "roots", None) or [])
    if roots:
        return roots
    named = str(getattr(config, "source", "") or "").rsplit(" [", 1)[0]
    if named == DEFAULT_SOURCE:
        from vlsearch.settings import data_root

        return [str(data_root().resolve())]
    folder = Path(named)
    return [str(folder.resolve())] if named and folder.is_absolute() and folder.is_dir() else []


@dataclass
class ImageRecord:
    """One gallery row: a photo, or one moment of a video (kind "video", its span in seconds, and the
    video's id; ``key`` is then the moment's frame)."""

    id: str
    path: str
    key: str
    kind: str = "image"
    t_start: float | None = None
    t_end: float | None = None
    video: str | None = None


ROW_COLUMNS = "row, id, path, key, kind, t_start, t_end, video"


class PlainIndex:
    """An open plain index folder. ``GalleryIndex`` (index/gallery.py) adds opening the segmented layout."""

    def __init__(self, path: Path, config: IndexConfig, images: VectorIndex, captions: VectorIndex | None):
        self.path, self.config, self.images, self.captions = Path(path), config, images, captions
        # as_uri() percent-encodes '#', '?' and '%': a folder name cannot turn into URI parameters
        uri = (self.path / "meta.sqlite").absolute().as_uri() + "?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._embeddings: np.ndarray | None = None
        self._dates: P.DateColumn | None = None
        try:
            cols = {c[1] for c in self._db.execute("PRAGMA table_info(images)")}
        except sqlite3.Error:  # a corrupt meta.sqlite: check_integrity says so, clearly
            cols = set()
        self.has_video_columns = "kind" in cols  # indexes written before videos have photos only
        self._columns = ROW_COLUMNS if self.has_video_columns else "row, id, path, key"

    def check_integrity(self) -> None:
        """Row counts of the metadata, the embeddings and faiss must match the config; a corrupt
        meta.sqlite fails here, at open, instead of on every search."""
        where = f"index at {self.path}"
        try:
            n_rows = self._db.execute("SELECT count(*) FROM images").fetchone()[0]
            n_caps = self._db.execute("SELECT count(*) FROM captions").fetchone()[0]
        except sqlite3.Error as e:
            raise IndexError_(
                f"{where}: meta.sqlite is unreadable ({e}); rebuild the index with `vlsearch index`"
            ) from e
        cfg = self.config
        counts = {
            "metadata rows": n_rows,
            "embeddings": len(self.embeddings),
            "faiss vectors": len(self.images),
        }
        bad = {k: v for k, v in counts.items() if v != cfg.n_images}
        if bad:
            got = ", ".join(f"{v} {k}" for k, v in counts.items())
            raise IndexError_(
                f"{where} is inconsistent: the config says {cfg.n_images} images, found {got}; rebuild it"
            )
        if cfg.n_captions and n_caps != cfg.n_captions:
            raise IndexError_(
                f"{where} is inconsistent: {n_caps} caption rows, the config says {cfg.n_captions}; rebuild it"
            )

    def paths_of_keys(self, keys) -> dict[str, str]:
        """Image file of each feature-cache key (for recomputing features the cache lost)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        q = f"SELECT key, path FROM images WHERE key IN ({','.join('?' * len(keys))})"
        return dict(self._db.execute(q, keys).fetchall())

    # -- reading --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> PlainIndex:
        """Open a plain index folder (a segment, say): one read, no retry, since segments never change."""
        return cls._open_once(Path(path))

    @classmethod
    def _other_layout(cls, path: Path, meta: dict):
        """The index to return instead when ``meta`` describes another layout; None: read this folder.
        ``GalleryIndex`` returns a segmented index here."""
        return None

    @classmethod
    def _open_once(cls, path: Path):
        cfg = path / "config.json"
        if not cfg.is_file():
            raise IndexError_(f"no index at {path}: build one with `vlsearch index`")
        try:
            meta = json.loads(cfg.read_text())
            check_stamp(meta, "index", path, IndexError_)
            other = cls._other_layout(path, meta)
            if other is not None:
                return other
            config = from_dict(IndexConfig, meta["config"])
            images = read_vector_index(path / "images.faiss", config.kind)
            captions = (
                read_vector_index(path / "captions.faiss", "flat")
                if (path / "captions.faiss").exists()
                else None
            )
            index = cls(path, config, images, captions)
            index.check_integrity()
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
        q = f"SELECT {self._columns} FROM images WHERE row IN ({','.join('?' * len(rows))})"
        found = {r: ImageRecord(*rest) for r, *rest in self._db.execute(q, rows)}
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

    def filter_rows(self, f: P.PhotoFilter) -> np.ndarray:
        """Sorted rows of the images passing the filters (SQLite, indexed columns; dates in memory)."""
        if P.date_only(f) and P.has_photos(self._db):
            if self._dates is None:
                self._dates = P.DateColumn(self._db)
            return self._dates.between(f.after, f.before)
        return P.matching_rows(self._db, f)

    def photos(self, rows) -> dict[int, PhotoMeta]:
        return P.read_photos(self._db, rows)

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = np.load(self.path / "embeddings.npy", mmap_mode="r")
        return self._embeddings

    def all_keys(self) -> list[str]:
        return [k for (k,) in self._db.execute("SELECT key FROM images ORDER BY row")]

    def all_records(self) -> list[ImageRecord]:
        """The live records in row order (as ``SegmentedIndex.all_records``: here every row is live)."""
        return read_records(self)

    def rows_and_records(self) -> list[tuple[int, ImageRecord]]:
        return list(enumerate(read_records(self)))

    def close(self) -> None:
        self._db.close()


def write_gallery(
    path: str | Path,
    config: IndexConfig,
    records: list[ImageRecord],
    embeddings: np.ndarray,
    captions: list[tuple[str, int]] | None = None,
    caption_embeddings: np.ndarray | None = None,
    photos: Iterable[PhotoMeta | None] | None = None,
    videos: list | None = None,
) -> Path:
    """Build a complete index folder in a temp folder and swap it in atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-{os.getpid()}-", dir=path.parent))
    try:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        config.n_images, config.dim = len(records), embeddings.shape[1]
        vi = make_vector_index(config.dim, len(records), config.kind)
        config.kind = vi.kind
        vi.add(embeddings)
        vi.write(tmp / "images.faiss")
        fault_point("faiss written")
        np.save(tmp / "embeddings.npy", embeddings.astype(np.float16))
        fault_point("embeddings written")
        db = sqlite3.connect(tmp / "meta.sqlite")
        db.execute(
            "CREATE TABLE images (row INTEGER PRIMARY KEY, id TEXT, path TEXT, key TEXT,"
            " kind TEXT DEFAULT 'image', t_start REAL, t_end REAL, video TEXT)"
        )
        db.execute("CREATE INDEX images_id ON images(id)")
        db.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(r, x.id, x.path, x.key, x.kind, x.t_start, x.t_end, x.video) for r, x in enumerate(records)],
        )
        if photos is not None:
            P.write_photos(db, (m or PhotoMeta() for m in photos))
        from vlsearch.index.videos import write_videos

        write_videos(db, videos or [])
        db.execute("CREATE TABLE captions (row INTEGER PRIMARY KEY, text TEXT, image_row INTEGER)")
        if captions:
            db.executemany(
                "INSERT INTO captions VALUES (?, ?, ?)", [(r, t, i) for r, (t, i) in enumerate(captions)]
            )
            db.execute("CREATE INDEX captions_image ON captions(image_row)")  # a deleted image's captions
            cv = make_vector_index(config.dim, len(captions), "flat")
            cv.add(caption_embeddings)
            cv.write(tmp / "captions.faiss")
            config.n_captions = len(captions)
        db.commit()
        db.close()
        fault_point("metadata written")
        atomic_write_json(tmp / "config.json", {**stamp(), "config": asdict(config)})
        fsync_tree(tmp)  # durable before it becomes visible
        fault_point("gallery written")
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
    """Replace ``path`` by the complete folder ``new``: one atomic exchange where the system has it
    (renameat2), else two renames (a kill between them is undone by ``manifest.recover_swap``)."""
    if path.exists() and _exchange(new, path):
        fault_point("folders exchanged")
        fsync_dir(path.parent)
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
        return
    old = path.with_name(f".{path.name}.old-{int(time.time() * 1e6)}")
    if path.exists():
        path.rename(old)
        fault_point("old folder aside")
    new.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def read_captions(index: PlainIndex) -> list[tuple[str, int]]:
    if hasattr(index, "shards"):  # segmented: captions of every segment, image rows made global
        return index.caption_rows(range(index.n_caption_rows))  # deleted images' too: row order
    return [(t, i) for t, i in index._db.execute("SELECT text, image_row FROM captions ORDER BY row")]


def read_photos(index: PlainIndex) -> list[PhotoMeta | None]:
    if hasattr(index, "shards"):
        return [m for s in index.shards for m in read_photos(s)]
    return P.all_photos(index._db, index.config.n_images)


def read_records(index: PlainIndex) -> list[ImageRecord]:
    """Every row's record in row order (a segmented index: deleted rows too, see ``all_records``)."""
    if hasattr(index, "shards"):
        return [r for s in index.shards for r in read_records(s)]
    q = f"SELECT {index._columns} FROM images ORDER BY row"
    return [ImageRecord(*rest) for _, *rest in index._db.execute(q)]

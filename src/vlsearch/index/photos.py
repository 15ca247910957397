"""The photos table of an index's SQLite: per-image metadata, indexed where queries filter.

``photos(row, taken, taken_source, make, model, lat, lon, folder, width, height, bytes)``, one row per
image row. Indexes built before it existed have no such table: they open as before and their images
count as having no metadata (a date, camera or place filter matches none of them; a folder filter
still works, from the stored path and id).
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass

import faiss
import numpy as np

from vlsearch.data.metadata import PhotoMeta
from vlsearch.index.vectors import inner_products

COLUMNS = PhotoMeta.columns()
EARTH_KM = 6371.0088


@dataclass
class PhotoFilter:
    """Filters a query runs inside retrieval. Times are unix seconds; ``near`` is (lat, lon, km)."""

    after: float | None = None
    before: float | None = None
    folder: str | None = None
    camera: str | None = None
    near: tuple[float, float, float] | None = None

    def __bool__(self) -> bool:
        return any(
            v not in (None, "") for v in (self.after, self.before, self.folder, self.camera, self.near)
        )


def write_photos(db: sqlite3.Connection, metas) -> None:
    """One row per image row, from any iterable of PhotoMeta (a 1M-row bench gallery streams them)."""
    cols = ", ".join(
        f"{c} {'TEXT' if c in ('taken_source', 'make', 'model', 'folder') else 'REAL'}" for c in COLUMNS
    )
    db.execute(f"CREATE TABLE photos (row INTEGER PRIMARY KEY, {cols})")
    db.executemany(
        f"INSERT INTO photos VALUES (?, {', '.join('?' * len(COLUMNS))})",
        ((r, *m.row()) for r, m in enumerate(metas)),
    )
    for name, cols in (
        ("taken", "taken"),
        ("folder", "folder"),
        ("camera", "make, model"),
        ("geo", "lat, lon"),
    ):
        db.execute(f"CREATE INDEX photos_{name} ON photos({cols})")


def has_photos(db: sqlite3.Connection) -> bool:
    return (
        db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='photos'").fetchone() is not None
    )


def read_photos(db: sqlite3.Connection, rows) -> dict[int, PhotoMeta]:
    """{row: metadata} for the rows that have it."""
    rows = [int(r) for r in rows]
    if not rows or not has_photos(db):
        return {}
    q = f"SELECT row, {', '.join(COLUMNS)} FROM photos WHERE row IN ({','.join('?' * len(rows))})"
    return {r: PhotoMeta(*vals) for r, *vals in db.execute(q, rows)}


def all_photos(db: sqlite3.Connection, n: int) -> list[PhotoMeta | None]:
    out: list[PhotoMeta | None] = [None] * n
    if has_photos(db):
        for r, *vals in db.execute(f"SELECT row, {', '.join(COLUMNS)} FROM photos"):
            out[r] = PhotoMeta(*vals)
    return out


class DateColumn:
    """Capture times sorted, with their rows, loaded once per opened index (16 bytes an image): a
    date-only filter is two binary searches instead of an SQLite range scan handing back 10k tuples."""

    def __init__(self, db: sqlite3.Connection):
        found = db.execute("SELECT taken, row FROM photos WHERE taken IS NOT NULL ORDER BY taken").fetchall()
        arr = np.array(found, dtype=np.float64).reshape(-1, 2)
        self.taken, self.rows = arr[:, 0].copy(), arr[:, 1].astype(np.int64)

    def between(self, after: float | None, before: float | None) -> np.ndarray:
        lo = 0 if after is None else int(np.searchsorted(self.taken, after, side="left"))
        hi = len(self.taken) if before is None else int(np.searchsorted(self.taken, before, side="left"))
        return np.sort(self.rows[lo:hi])


def date_only(f: PhotoFilter) -> bool:
    return not (f.folder or f.camera or f.near) and (f.after is not None or f.before is not None)


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def matching_rows(db: sqlite3.Connection, f: PhotoFilter) -> np.ndarray:
    """Sorted rows (int64) of the images that pass every filter, from SQLite's indexes."""
    where, args = [], []
    photos = has_photos(db)
    if f.folder:
        prefix = f.folder.strip().rstrip("/")
        col = "images.path" if prefix.startswith("/") else ("photos.folder" if photos else "images.id")
        where.append(f"({col} = ? OR {col} LIKE ? ESCAPE '\\')")
        args += [prefix, _like_prefix(prefix) + "/%"]
    needs_meta = f.after is not None or f.before is not None or f.camera or f.near
    if needs_meta and not photos:
        return np.zeros(0, dtype=np.int64)
    if f.after is not None:
        where.append("photos.taken >= ?")
        args.append(float(f.after))
    if f.before is not None:
        where.append("photos.taken < ?")
        args.append(float(f.before))
    if f.camera:
        where.append("(photos.make || ' ' || photos.model) LIKE ? ESCAPE '\\'")
        args.append(f"%{_like_prefix(f.camera.strip())}%")
    if f.near:
        lat, lon, km = f.near
        dlat = math.degrees(km / EARTH_KM)
        where.append("photos.lat BETWEEN ? AND ?")
        args += [lat - dlat, lat + dlat]
    if photos and not f.folder:  # the photos table alone answers it (its row is the image row)
        where = [w.replace("photos.", "") for w in where]
        table, cols = "photos", "row, lat, lon" if f.near else "row"
    else:
        table = "images JOIN photos ON photos.row = images.row" if photos else "images"
        cols = "images.row, photos.lat, photos.lon" if f.near else "images.row"
    q = f"SELECT {cols} FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
    found = db.execute(q, args).fetchall()
    if f.near:
        lat, lon, km = f.near
        found = [
            (r,)
            for r, a, b in found
            if a is not None and b is not None and haversine_km(lat, lon, a, b) <= km
        ]
    rows = np.fromiter((r[0] for r in found), dtype=np.int64, count=len(found))
    rows.sort()
    return rows


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


EXACT_SUBSET = 100_000  # below this many matches, score them exactly from the stored embeddings


def search_filtered(
    vi, embeddings, query: np.ndarray, k: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows) of one query among ``allowed`` rows only, so a filtered query returns k
    results whenever k images match. Few matches: exact scores from the fp16 embeddings (a 1% slice of
    1M images is 10k dot products). Many: faiss with an ID selector inside the search (Flat, HNSW),
    else over-fetching until k matches are in hand."""
    k = min(int(k), len(allowed))
    if k <= 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    if len(allowed) <= EXACT_SUBSET and embeddings is not None:
        flat = _fp32_view(vi)  # the faiss index's own float32 vectors when it keeps them, else fp16
        scores = inner_products(flat[allowed] if flat is not None else embeddings[allowed], q[0])
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((allowed[top], -scores[top]))]
        return scores[top], allowed[top]
    index = getattr(vi, "index", None)
    if getattr(vi, "kind", "") in ("flat", "hnsw") and index is not None:
        sel = faiss.IDSelectorBatch(
            len(allowed), faiss.swig_ptr(np.ascontiguousarray(allowed, dtype=np.int64))
        )
        if vi.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(index.hnsw.efSearch, 2 * k))
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, rows = index.search(q, k, params=params)
        keep = rows[0] >= 0
        if keep.sum() >= k or vi.kind == "flat":
            return scores[0][keep], rows[0][keep]
    member = np.zeros(len(vi), dtype=bool)
    member[allowed] = True
    m = max(4 * k, int(k * len(vi) / max(1, len(allowed))) * 2)
    while True:
        scores, rows = vi.search(q, min(m, len(vi)))
        scores, rows = scores[0], rows[0]
        ok = (rows >= 0) & member[np.clip(rows, 0, None)]
        if ok.sum() >= k or m >= len(vi):
            return scores[ok][:k], rows[ok][:k]
        m *= 4


def _fp32_view(vi) -> np.ndarray | None:
    """A numpy view of a Flat (or HNSW's flat storage) faiss index's vectors, without a copy."""
    index = getattr(vi, "index", None)
    if getattr(vi, "kind", "") == "hnsw" and index is not None:
        index = faiss.downcast_index(index.storage)
    if not isinstance(index, faiss.IndexFlat) or index.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)

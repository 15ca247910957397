"""A content-addressed, chunked, memory-mapped store of per-item token arrays.

Each item (an image file's content, a caption's text) has one variable-length [n, dim] array per field.
Rows are appended in chunks; every chunk is written to temp files and renamed before it is registered in
SQLite, so a killed run loses at most the chunk in flight and the next run resumes from what is registered.
"""

from __future__ import annotations

import json
import mmap
import sqlite3
import threading
import uuid
from pathlib import Path

import numpy as np

from vlsearch.config import atomic_write_json, check_stamp, stamp
from vlsearch.errors import VLSearchError


def _prefetch(data: np.ndarray, start: int, stop: int) -> None:
    """Ask the kernel to read rows [start, stop) of a memory-mapped array ahead (madvise WILLNEED).

    Called for every item of a batch before any is copied, so the reads of items that are not in the page
    cache go to the disk together instead of one page fault (and its readahead) after another: a
    re-ranking query's 50 candidates, cold. A no-op where the array is not a memory map."""
    mm = getattr(data, "_mmap", None)
    if mm is None or stop <= start or not hasattr(mm, "madvise"):
        return
    base = int(getattr(data, "offset", 0)) % mmap.ALLOCATIONGRANULARITY  # where the array starts in mm
    row = data.strides[0]
    lo = base + start * row
    hi = base + stop * row
    lo -= lo % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_WILLNEED, lo, min(hi, len(mm)) - lo)
    except (OSError, ValueError):
        pass


class TokenStore:
    def __init__(self, root: str | Path, fields: dict[str, tuple[int, str]], meta: dict):
        """fields: name -> (dim, numpy dtype name). meta: what made the features (backbone, resolution...)."""
        self.root = Path(root)
        self.fields = {k: (int(d), str(t)) for k, (d, t) in fields.items()}
        self.root.mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "config.json"
        cfg = {**stamp(), "fields": {k: list(v) for k, v in self.fields.items()}, "meta": meta}
        if cfg_path.exists():
            old = json.loads(cfg_path.read_text())
            check_stamp(old, "feature cache", self.root)
            if old.get("fields") != cfg["fields"] or old.get("meta") != meta:
                raise VLSearchError(
                    f"feature cache {self.root} was made with another backbone config; delete it"
                )
        else:
            atomic_write_json(cfg_path, cfg)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, chunk TEXT, row INTEGER)")
        self._db.commit()
        self._maps: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def sample_keys(self, n: int) -> list[str]:
        """Up to ``n`` stored keys (for smoke checks)."""
        return [k for (k,) in self._db.execute("SELECT key FROM items LIMIT ?", (int(n),))]

    def missing(self, keys: list[str]) -> list[str]:
        have = self._lookup(list(dict.fromkeys(keys)))
        return [k for k in dict.fromkeys(keys) if k not in have]

    def _lookup(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        with self._lock:
            for i in range(0, len(keys), 900):
                part = keys[i : i + 900]
                q = f"SELECT key, chunk, row FROM items WHERE key IN ({','.join('?' * len(part))})"
                out.update({k: (c, r) for k, c, r in self._db.execute(q, part)})
        return out

    def put(self, keys: list[str], arrays: dict[str, list[np.ndarray]]) -> None:
        """Append one chunk of items. arrays[field][i] is item i's [n_i, dim] array."""
        if not keys:
            return
        chunk = uuid.uuid4().hex[:16]
        for name, (dim, dtype) in self.fields.items():
            items = arrays[name]
            lengths = np.array([len(a) for a in items], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            flat = np.concatenate([np.asarray(a, dtype=dtype).reshape(-1, dim) for a in items], axis=0)
            for suffix, arr in (("data", flat), ("offsets", offsets)):
                final = self.root / f"chunk-{chunk}.{name}.{suffix}.npy"
                tmp = final.with_name(final.name + ".tmp")
                with open(tmp, "wb") as f:
                    np.save(f, arr)
                tmp.replace(final)
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO items (key, chunk, row) VALUES (?, ?, ?)",
                [(k, chunk, r) for r, k in enumerate(keys)],
            )
            self._db.commit()

    def _open(self, chunk: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        key = (chunk, name)
        if key not in self._maps:
            data = np.load(self.root / f"chunk-{chunk}.{name}.data.npy", mmap_mode="r")
            offsets = np.load(self.root / f"chunk-{chunk}.{name}.offsets.npy")
            self._maps[key] = (data, offsets)
        return self._maps[key]

    def get(self, keys: list[str], name: str) -> list[np.ndarray]:
        """Item arrays for keys (each [n_i, dim]); raises KeyError naming a missing key."""
        where = self._lookup(list(dict.fromkeys(keys)))
        for k in keys:
            if k not in where:
                raise KeyError(f"feature cache {self.root} has no item {k}")
        spans = []
        for k in keys:
            chunk, row = where[k]
            data, offsets = self._open(chunk, name)
            spans.append((data, int(offsets[row]), int(offsets[row + 1])))
        if len(spans) > 1:
            for data, a, b in spans:
                _prefetch(data, a, b)
        return [np.asarray(data[a:b]) for data, a, b in spans]

    def evict_page_cache(self) -> int:
        """Close the memory maps and drop the chunk files from the OS page cache (posix_fadvise
        DONTNEED), so the next reads come from disk: the bench's cold case. Returns the bytes evicted."""
        import os

        with self._lock:
            self._maps.clear()
        total = 0
        for path in self.root.glob("chunk-*.npy"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        return total

    def bytes_per_item(self) -> float:
        """Mean bytes on disk per stored item (every field's data files, offsets included)."""
        n = len(self)
        return sum(p.stat().st_size for p in self.root.glob("chunk-*.npy")) / n if n else 0.0

    def get_stacked(self, keys: list[str], name: str) -> np.ndarray:
        """[N, n, dim] for a field whose items all have the same length (image grids)."""
        return (
            np.stack(self.get(keys, name))
            if keys
            else np.zeros((0, 0, self.fields[name][0]), self.fields[name][1])
        )

    def get_padded(
        self, keys: list[str], name: str, max_len: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """([N, L, dim] zero-padded, lengths [N]) for variable-length items (token states)."""
        items = self.get(keys, name)
        lengths = np.array([min(len(a), max_len or len(a)) for a in items], dtype=np.int64)
        L = int(lengths.max()) if len(items) else 0
        dim, dtype = self.fields[name]
        out = np.zeros((len(items), L, dim), dtype=dtype)
        for i, a in enumerate(items):
            out[i, : lengths[i]] = a[: lengths[i]]
        return out, lengths

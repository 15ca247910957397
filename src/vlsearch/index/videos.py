"""The videos of a gallery index: one row per video in meta.sqlite (metadata and the range of gallery
rows holding its moments). Indexes written before videos existed simply have no such table.

A segmented index (index/segments.py) keeps each video in the segment that added it, with rows local
to that segment; the readers here number them globally and leave out deleted videos. A video is
deleted whole (index/update.py tombstones all its moment rows), so its first row tells.
"""

from __future__ import annotations

import sqlite3
from dataclasses import astuple, dataclass, fields, replace

import numpy as np


@dataclass
class VideoRecord:
    id: str
    path: str
    key: str  # content hash of the file
    duration: float
    width: int
    height: int
    fps: float
    rotation: int
    size: int
    captured: str | None
    first_row: int  # its moments are gallery rows first_row .. first_row + n_rows - 1, in time order
    n_rows: int


COLUMNS = [f.name for f in fields(VideoRecord)]


def write_videos(db: sqlite3.Connection, videos: list[VideoRecord]) -> None:
    db.execute(
        "CREATE TABLE videos (id TEXT PRIMARY KEY, path TEXT, key TEXT, duration REAL, width INTEGER,"
        " height INTEGER, fps REAL, rotation INTEGER, size INTEGER, captured TEXT, first_row INTEGER,"
        " n_rows INTEGER)"
    )
    db.executemany(
        f"INSERT INTO videos VALUES ({','.join('?' * len(COLUMNS))})", [astuple(v) for v in videos]
    )


def has_videos_table(db: sqlite3.Connection) -> bool:
    q = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='videos'"
    return db.execute(q).fetchone() is not None


def _segments(index):
    """(plain segment, row offset, deleted local rows) of a segmented index, oldest first."""
    return zip(index.shards, index.offsets, index.dead_local, strict=True)


def _live(videos: list[VideoRecord], offset: int, dead: np.ndarray) -> list[VideoRecord]:
    gone = set(dead.tolist())
    return [replace(v, first_row=v.first_row + offset) for v in videos if v.first_row not in gone]


def read_videos(index) -> list[VideoRecord]:
    """The live videos, in row order (first_row numbers the index's rows)."""
    if hasattr(index, "shards"):
        return [v for s, off, dead in _segments(index) for v in _live(read_videos(s), off, dead)]
    if not has_videos_table(index._db):
        return []
    q = f"SELECT {','.join(COLUMNS)} FROM videos ORDER BY first_row"
    return [VideoRecord(*r) for r in index._db.execute(q)]


def videos_by_id(index, ids) -> dict[str, VideoRecord]:
    """{id: live video} of those of ``ids`` the index holds (a segmented index: the newest segment wins,
    as for photos)."""
    ids = list(dict.fromkeys(ids))
    if not ids:
        return {}
    if hasattr(index, "shards"):
        out: dict[str, VideoRecord] = {}
        for s, off, dead in _segments(index):
            found = _live(list(videos_by_id(s, ids).values()), off, dead)
            out.update({v.id: v for v in found})
        return out
    if not has_videos_table(index._db):
        return {}
    q = f"SELECT {','.join(COLUMNS)} FROM videos WHERE id IN ({','.join('?' * len(ids))})"
    return {r[0]: VideoRecord(*r) for r in index._db.execute(q, ids)}


def video_by_id(index, video_id: str) -> VideoRecord | None:
    return videos_by_id(index, [video_id]).get(video_id)


def moment_spans(index) -> tuple[np.ndarray, np.ndarray]:
    """(t_start, t_end) per index row, nan for photos (a segmented index: over all its rows)."""
    if hasattr(index, "shards"):
        parts = [moment_spans(s) for s in index.shards]
        return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
    n = len(index.embeddings)
    ts, te = np.full(n, np.nan), np.full(n, np.nan)
    if index.has_video_columns and has_videos_table(index._db):
        q = "SELECT row, t_start, t_end FROM images WHERE kind = 'video'"
        for row, a, b in index._db.execute(q):
            ts[row], te[row] = a, b
    return ts, te


def video_layout(records, first_row: int, known: list[VideoRecord]) -> list[VideoRecord]:
    """The records of the videos whose moments are among ``records`` (image records, each video's
    moments contiguous), renumbered for rows from ``first_row``."""
    by_id = {v.id: v for v in known}
    out: list[VideoRecord] = []
    for row, rec in enumerate(records, first_row):
        if rec.kind != "video":
            continue
        if out and out[-1].id == rec.video:
            out[-1].n_rows += 1
            continue
        out.append(replace(by_id[rec.video], first_row=row, n_rows=1))
    return out

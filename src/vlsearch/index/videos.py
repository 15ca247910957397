"""The videos of a gallery index: one row per video in meta.sqlite (metadata and the range of gallery
rows holding its moments). Indexes written before videos existed simply have no such table."""

from __future__ import annotations

import sqlite3
from dataclasses import astuple, dataclass, fields


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


def _has_table(index) -> bool:
    db = getattr(index, "_db", None)  # a segmented index holds photos only (index/update.py)
    if db is None:
        return False
    return (
        db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='videos'").fetchone() is not None
    )


def read_videos(index) -> list[VideoRecord]:
    if not _has_table(index):
        return []
    q = f"SELECT {','.join(COLUMNS)} FROM videos ORDER BY first_row"
    return [VideoRecord(*r) for r in index._db.execute(q)]


def video_by_id(index, video_id: str) -> VideoRecord | None:
    if not _has_table(index):
        return None
    q = f"SELECT {','.join(COLUMNS)} FROM videos WHERE id = ?"
    row = index._db.execute(q, (video_id,)).fetchone()
    return VideoRecord(*row) if row else None


def videos_by_id(index, ids) -> dict[str, VideoRecord]:
    ids = list(dict.fromkeys(ids))
    if not ids or not _has_table(index):
        return {}
    q = f"SELECT {','.join(COLUMNS)} FROM videos WHERE id IN ({','.join('?' * len(ids))})"
    return {r[0]: VideoRecord(*r) for r in index._db.execute(q, ids)}

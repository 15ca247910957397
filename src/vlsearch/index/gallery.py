"""Opening an index folder of either layout: ``GalleryIndex.open`` gives a plain index (index/plain.py)
or a segmented one (index/segments.py, immutable plain folders + a manifest).

The plain folder code lives in plain.py, below segments.py, which builds on it; this module sits above
both, so the dispatch needs no import cycle. The plain folder's names are re-exported here, where
callers have always imported them from.
"""

from __future__ import annotations

from pathlib import Path

from vlsearch.errors import IndexError_
from vlsearch.index.manifest import is_segmented, recover_swap
from vlsearch.index.plain import (
    ROW_COLUMNS,
    ImageRecord,
    IndexConfig,
    PlainIndex,
    read_captions,
    read_photos,
    read_records,
    swap_in,
    write_gallery,
    write_lock,
)
from vlsearch.index.segments import SegmentedIndex

__all__ = [
    "ROW_COLUMNS",
    "GalleryIndex",
    "ImageRecord",
    "IndexConfig",
    "PlainIndex",
    "read_captions",
    "read_photos",
    "read_records",
    "swap_in",
    "write_gallery",
    "write_lock",
]


class GalleryIndex(PlainIndex):
    """A plain index folder, whose ``open`` also opens the segmented layout (then a ``SegmentedIndex``)."""

    @classmethod
    def open(cls, path: str | Path) -> GalleryIndex | SegmentedIndex:
        """Open an index; a writer replacing the manifest while this reads it (compaction removing
        segments, a plain index converted) makes it read again, up to a few times."""
        path = Path(path)
        if not path.exists():
            recover_swap(path)  # a swap killed between its two renames (systems without renameat2)
        for attempt in range(5):
            before = _stat_key(path / "config.json")
            try:
                return cls._open_once(path)
            except IndexError_:
                if attempt == 4 or _stat_key(path / "config.json") == before:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _other_layout(cls, path: Path, meta: dict) -> SegmentedIndex | None:
        if is_segmented(meta):  # immutable segments + a manifest (index/segments.py)
            return SegmentedIndex.open(path, meta)
        return None


def _stat_key(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)

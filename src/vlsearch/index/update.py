"""Writes to a segmented index: add a segment, delete rows (tombstones), compact, convert older layouts.

Every write runs ``commit``: under the index's write lock it cleans what killed writers left, reads the
current manifest, lets the write change it and replaces it durably (index/manifest.py). Adds cost O(new):
one new segment; deletes write tombstones into the manifest. Compaction merges the segments without the
lock held (the service keeps answering, adds and deletes keep landing) and then, under the lock, keeps
what landed meanwhile: segments added since, and deletes of rows it merged.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from vlsearch.config import from_dict
from vlsearch.data.datasets import widen_roots
from vlsearch.data.metadata import PhotoMeta
from vlsearch.errors import IndexError_
from vlsearch.index.gallery import GalleryIndex
from vlsearch.index.manifest import (
    LAYOUT,
    Manifest,
    clean,
    fault_point,
    fsync_dir,
    fsync_tree,
    is_segmented,
    manifest_of,
    new_segment_name,
    read_manifest_meta,
    temp_dir,
    write_manifest,
)
from vlsearch.index.plain import (
    ImageRecord,
    IndexConfig,
    index_roots,
    read_captions,
    read_photos,
    read_records,
    write_gallery,
    write_lock,
)
from vlsearch.index.videos import VideoRecord, has_videos_table, read_videos, video_layout


def commit(path: Path, change: Callable[[Manifest], Manifest | None]) -> Manifest | None:
    """Read, change and durably replace the manifest under the write lock (a plain or old sharded index
    is converted first). ``change`` returns the new manifest, or None to leave the index as it is."""
    path = Path(path)
    with write_lock(path):
        clean(path)
        current = _segmented(path)
        if not current.config.get("roots"):  # an index from before roots: this write records them
            roots = index_roots(from_dict(IndexConfig, current.config))
            current = replace(current, config={**current.config, "roots": roots})
        new = change(current)
        if new is None:
            return current
        new.generation = current.generation + 1
        write_manifest(path, new)
        fault_point("committed")
        clean(path)  # segments the new manifest no longer lists
        return new


def _segmented(path: Path) -> Manifest:
    """The manifest of the index at ``path``, converting a plain one-folder index into its first segment
    (hard links: no copy) and an old sharded one in place. Call under the write lock."""
    meta = read_manifest_meta(path)
    if meta is None:
        raise IndexError_(f"no index at {path}: build one with `vlsearch index`")
    if is_segmented(meta):
        if meta.get("layout") != LAYOUT:
            manifest = manifest_of(meta)
            write_manifest(path, manifest)
            return manifest
        return manifest_of(meta)
    GalleryIndex.open(path).close()  # checks it
    tmp = temp_dir(path)
    for name in os.listdir(path):
        if name in ("config.json", "images.faiss", "captions.faiss", "embeddings.npy", "meta.sqlite"):
            os.link(path / name, tmp / name)
    fsync_tree(tmp)
    seg = new_segment_name()
    os.rename(tmp, path / seg)
    fsync_dir(path)
    config = dict(meta["config"])
    config["kind"] = LAYOUT
    manifest = Manifest(config, [seg], {}, 0)
    write_manifest(path, manifest)
    return manifest


def convert(path: str | Path) -> Manifest:
    """`vlsearch index --compact` and every write do this: a plain or sharded index becomes segmented."""
    return commit(Path(path), lambda m: None)  # type: ignore[return-value]


def _segment_config(manifest: Manifest, kind: str = "auto") -> IndexConfig:
    return IndexConfig(**{**manifest.config, "kind": kind, "n_images": 0, "n_captions": 0})


def _with_counts(manifest: Manifest, d_images: int, d_captions: int = 0) -> dict:
    cfg = dict(manifest.config)
    cfg["n_images"] = int(cfg["n_images"]) + d_images
    cfg["n_captions"] = int(cfg.get("n_captions", 0)) + d_captions
    return cfg


def write_segment(
    path: Path,
    manifest: Manifest,
    records: list[ImageRecord],
    emb: np.ndarray,
    photos,
    write=write_gallery,
    videos: list[VideoRecord] | None = None,
) -> str:
    """One new immutable segment (unlisted until the manifest names it); returns its name. ``videos``:
    the records of the videos whose moments are among ``records`` (rows local to the segment)."""
    name = new_segment_name()
    write(path / name, _segment_config(manifest), records, emb, photos=photos, videos=videos or [])
    fault_point("segment written")
    return name


def segment_ids(path: Path, name: str, ids: list[str]) -> dict[str, list[int]]:
    """{id: rows} of the given ids in one segment's metadata (SQLite's id indexes: no vectors loaded). A
    photo's id names its row; a video's id all its moments' rows, in time order. Moments are not
    removed one by one (a video's moments stay whole), so a moment's own id names nothing here."""
    uri = (path / name / "meta.sqlite").absolute().as_uri() + "?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        cols = {c[1] for c in db.execute("PRAGMA table_info(images)")}
        photos_only = " AND kind = 'image'" if "kind" in cols else ""
        videos = has_videos_table(db)
        out: dict[str, list[int]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            q = f"SELECT id, row FROM images WHERE id IN ({marks}){photos_only}"
            out.update({i: [r] for i, r in db.execute(q, part)})
            if videos:
                q = f"SELECT id, first_row, n_rows FROM videos WHERE id IN ({marks})"
                out.update({i: list(range(a, a + n)) for i, a, n in db.execute(q, part)})
        return out
    finally:
        db.close()


def find_live(path: Path, manifest: Manifest, ids: list[str]) -> dict[str, tuple[str, list[int]]]:
    """{id: (segment, rows)} of the live images and videos of ``ids`` (the newest segment holding an id
    wins)."""
    todo, found = list(dict.fromkeys(ids)), {}
    for name in reversed(manifest.segments):
        if not todo:
            break
        dead = set(manifest.dead(name))
        hits = {i: rs for i, rs in segment_ids(path, name, todo).items() if rs and rs[0] not in dead}
        found.update({i: (name, rs) for i, rs in hits.items()})
        todo = [i for i in todo if i not in hits]
    return found


def _rows_by_segment(found: dict[str, tuple[str, list[int]]]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for name, rs in found.values():
        rows.setdefault(name, []).extend(rs)
    return rows


def with_tombstones(
    manifest: Manifest, rows: dict[str, list[int]], added: list[str] | None = None, n_added: int = 0
) -> Manifest:
    """A copy of ``manifest`` with ``rows`` ({segment: rows}) deleted and segments ``added`` appended."""
    tomb = {k: list(v) for k, v in manifest.tombstones.items()}
    n_removed = 0
    for name, rs in rows.items():
        have = set(tomb.get(name, []))
        new = sorted(set(int(r) for r in rs) - have)
        n_removed += len(new)
        if new:
            tomb[name] = sorted(have | set(new))
    return Manifest(
        _with_counts(manifest, n_added - n_removed),
        manifest.segments + list(added or []),
        tomb,
        manifest.generation,
    )


def remove_ids(path: str | Path, ids) -> list[str]:
    """Delete images by id (tombstones; ``--compact`` reclaims the space). Returns the ids removed."""
    path, ids = Path(path), [str(i) for i in ids]
    removed: list[str] = []

    def change(m: Manifest):
        found = find_live(path, m, ids)
        if not found:
            return None
        removed.extend(i for i in ids if i in found)
        return with_tombstones(m, _rows_by_segment(found))

    commit(path, change)
    return removed


def add_records(
    path: str | Path,
    records: list[ImageRecord],
    emb: np.ndarray,
    photos: list[PhotoMeta] | None = None,
    skip_paths: bool = True,
    write=write_gallery,
    videos: list[VideoRecord] | None = None,
) -> int:
    """Add embedded images and video moments as one new segment (``videos``: the records of the videos
    whose moments are among ``records``); with ``skip_paths``, paths already live (another writer
    added them meanwhile) are left out. Returns the number of rows added."""
    path = Path(path)
    added = [0]

    def change(m: Manifest):
        keep = list(range(len(records)))
        if skip_paths:
            have = live_paths(path, m)
            keep = [i for i in keep if records[i].path not in have]
        if not keep:
            return None
        recs = [records[i] for i in keep]
        phs = [photos[i] for i in keep] if photos is not None else None
        vids = video_layout(recs, 0, videos or [])
        name = write_segment(path, m, recs, np.asarray(emb, np.float32)[keep], phs, write, vids)
        added[0] = len(recs)
        return with_tombstones(with_roots(m, recs), {}, [name], len(recs))

    commit(path, change)
    return added[0]


def with_roots(manifest: Manifest, records: list[ImageRecord]) -> Manifest:
    """The folders of added files join the index's roots (the service serves files inside them only).
    An index that names no roots (nor a folder it was built from: ``commit``) keeps none."""
    roots = list(manifest.config.get("roots") or [])
    if not roots:
        return manifest
    config = {**manifest.config, "roots": widen_roots(roots, [r.path for r in records])}
    return replace(manifest, config=config)


def live_paths(path: Path, manifest: Manifest) -> set[str]:
    out: set[str] = set()
    for name in manifest.segments:
        uri = (path / name / "meta.sqlite").absolute().as_uri() + "?mode=ro"
        db = sqlite3.connect(uri, uri=True)
        try:
            dead = set(manifest.dead(name))
            out.update(p for r, p in db.execute("SELECT row, path FROM images") if r not in dead)
        finally:
            db.close()
    return out


# -- compaction -------------------------------------------------------------------------------------------
def compact(path: str | Path, kind: str = "auto") -> dict:
    """Merge all segments into one without the deleted rows, with the ANN kind for the merged size."""
    path = Path(path)
    convert(path)
    index = GalleryIndex.open(path)
    if not hasattr(index, "shards"):
        index.close()
        raise IndexError_(f"the index at {path} was rebuilt meanwhile; run `--compact` again")
    snap = index.manifest
    pairs = index.rows_and_records()  # whole-table reads: no million-parameter queries
    rows = np.asarray([r for r, _ in pairs], np.int64)
    recs = [rec for _, rec in pairs]
    del pairs
    emb = np.asarray(index.embeddings[rows], np.float32) if len(rows) else np.zeros((0, index.config.dim))
    photos_all = read_photos(index)
    photos = [photos_all[r] or PhotoMeta() for r in rows.tolist()]
    new_row = {int(r): n for n, r in enumerate(rows.tolist())}
    videos = [replace(v, first_row=new_row[v.first_row]) for v in read_videos(index)]  # live: whole
    caps, cap_emb = [], None
    if index.captions is not None:
        all_caps = read_captions(index)
        keep = [c for c, (_, i) in enumerate(all_caps) if i in new_row]
        caps = [(all_caps[c][0], new_row[all_caps[c][1]]) for c in keep]
        cap_emb = index.captions.reconstruct_all()[keep] if keep else None
    seg_of = [(name, off) for name, off in zip(snap.segments, index.offsets, strict=True)]
    n_before, n_dead = len(index.images), len(index.dead)
    index.close()
    if not len(rows):
        raise IndexError_(f"every image of the index at {path} is deleted: nothing to compact into")
    stage = temp_dir(path, "compact")
    try:
        write_gallery(
            stage / "seg", _segment_config(snap, kind), recs, emb, caps or None, cap_emb, photos, videos
        )
        fsync_dir(stage)
        fault_point("compacted segment written")
        local = {}  # (segment, local row) -> merged row
        for g, n in new_row.items():
            s = int(np.searchsorted([o for _, o in seg_of], g, side="right") - 1)
            local[(seg_of[s][0], g - seg_of[s][1])] = n
        result = {}

        def change(m: Manifest):
            if not set(snap.segments) <= set(m.segments):
                raise IndexError_(f"another compaction of {path} ran meanwhile; run `--compact` again")
            name = new_segment_name()
            os.rename(stage / "seg", path / name)
            fsync_dir(path)
            later = [s for s in m.segments if s not in snap.segments]  # added during the merge
            merged_dead = sorted(
                local[(s, r)] for s in snap.segments for r in m.dead(s) if (s, r) in local
            )  # deleted during the merge
            tomb = {s: m.dead(s) for s in later if m.dead(s)}
            if merged_dead:
                tomb[name] = merged_dead
            n_live = (
                len(rows) - len(merged_dead) + sum(_segment_rows(path, s) - len(m.dead(s)) for s in later)
            )
            cfg = dict(m.config)
            cfg["n_images"] = n_live
            result.update(
                segments_before=len(m.segments),
                segments_after=1 + len(later),
                rows_dropped=n_dead,
                n_images=n_live,
            )
            return Manifest(cfg, [name, *later], tomb, m.generation)

        commit(path, change)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    result["n_images_before"] = n_before
    return result


def _segment_rows(path: Path, name: str) -> int:
    meta = read_manifest_meta(path / name)
    return int(meta["config"]["n_images"]) if meta else 0


def live_state(path: str | Path) -> dict[str, tuple[str, str, bytes]]:
    """{id: (path, key, fp16 embedding bytes)} of the live images: what tests compare before/after."""
    index = GalleryIndex.open(path)
    try:
        if hasattr(index, "shards"):
            pairs = index.rows_and_records()
        else:
            pairs = list(enumerate(read_records(index)))
        rows = [r for r, _ in pairs]
        emb = np.asarray(index.embeddings[rows], np.float16) if rows else np.zeros((0, 0), np.float16)
        return {rec.id: (rec.path, rec.key, emb[i].tobytes()) for i, (_, rec) in enumerate(pairs)}
    finally:
        index.close()


def describe(path: str | Path) -> dict:
    meta = read_manifest_meta(Path(path)) or {}
    if not is_segmented(meta):
        return {"layout": "plain", "segments": 1, "deleted": 0}
    m = manifest_of(meta)
    return {
        "layout": LAYOUT,
        "segments": len(m.segments),
        "deleted": m.n_dead(),
        "generation": m.generation,
        "config": asdict(IndexConfig(**m.config)) if m.config else {},
    }


def sync_write(
    path: str | Path,
    records: list[ImageRecord],
    emb: np.ndarray,
    photos,
    remove: list[str],
    videos: list[VideoRecord] | None = None,
) -> None:
    """One write for a sync: delete the photos and videos of ``remove`` and add ``records`` (photos, and
    the moments of ``videos``) as a new segment, in a single manifest swap (a reader sees the folder's
    old state or its new one)."""
    path = Path(path)

    def change(m: Manifest):
        found = find_live(path, m, list(remove)) if remove else {}
        rows = _rows_by_segment(found)
        added = []
        if records:
            emb32 = np.asarray(emb, np.float32)
            added = [write_segment(path, m, records, emb32, photos, videos=videos)]
        if not rows and not added:
            return None
        return with_tombstones(with_roots(m, records), rows, added, len(records))

    commit(path, change)

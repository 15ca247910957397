"""Keep an index equal to a folder, by content key (the hash of each file's bytes, as the feature cache
keys it: ``encoders.features.photo_key``, and ``file_key`` for videos).

The plan compares the folder's photos with the index's live rows:
- a path the index lacks is *added*; if its content is already in the index (a moved, renamed or
  copied file) its embedding is reused instead of computed again;
- a path whose content changed is *re-embedded* (its old row deleted, a new one added);
- a path the folder lost is *removed*;
- identical files each keep their own row (id and path, as a fresh build gives them), embedded once;
- a video whose path, id or content is new is indexed whole (its frames' features are cached by
  content, so a moved video decodes nothing), and its old moments are removed.

Applying the plan is one write (index/update.py): a new segment holding the added rows, and tombstones
for the removed ones, in a single manifest swap. The result equals a fresh build of the folder: the same
ids, paths, keys and embeddings (rows may be numbered otherwise until ``--compact``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlsearch.data import ImageReport
from vlsearch.encoders.features import file_key, photo_key
from vlsearch.index.gallery import GalleryIndex
from vlsearch.index.plain import ImageRecord


@dataclass
class SyncPlan:
    add: list[tuple[str, str, str]] = field(default_factory=list)  # (id, path, key): to embed
    move: list[tuple[str, str, str, int]] = field(default_factory=list)  # (id, path, key, row to reuse)
    change: list[tuple[str, str, str]] = field(default_factory=list)  # (id, path, new key): re-embedded
    remove: list[str] = field(default_factory=list)  # ids of rows to delete (gone, changed or moved away)
    add_videos: list[tuple[str, str]] = field(default_factory=list)  # (id, path): new, changed or moved
    unchanged: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.add or self.move or self.change or self.remove or self.add_videos)

    def summary(self) -> str:
        videos = f", {len(self.add_videos)} videos to (re-)index" if self.add_videos else ""
        return (
            f"{len(self.add)} to add, {len(self.change)} changed (re-embed), {len(self.move)} moved or"
            f" copied (embedding reused){videos}, {len(self.remove)} to remove, {self.unchanged} unchanged"
        )

    def lines(self) -> list[str]:
        out = [f"add     {i}" for i, _, _ in self.add]
        out += [f"change  {i}" for i, _, _ in self.change]
        out += [f"move    {i}" for i, _, _, _ in self.move]
        out += [f"video   {i}" for i, _ in self.add_videos]
        out += [f"remove  {i}" for i in self.remove]
        return out


class KeyCache:
    """Content keys of files by (size, mtime): a watcher's later syncs hash only what changed."""

    def __init__(self):
        self._keys: dict[str, tuple[int, int, str]] = {}

    def key(self, path: str, size: int | None) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        hit = self._keys.get(path)
        if hit and hit[:2] == (st.st_size, st.st_mtime_ns):
            return hit[2]
        try:
            k = photo_key(path, size) if size is not None else file_key(path)
        except OSError:
            return None
        self._keys[path] = (st.st_size, st.st_mtime_ns, k)
        return k

    def video_key(self, path: str) -> str | None:
        """A video's content key (``encoders.features.file_key``), cached as photos' are."""
        return self.key(path, None)


def folder_photos(folder: Path, exclude=()) -> dict[str, str]:
    """{resolved path: id} of the photos a fresh build of ``folder`` indexes."""
    from vlsearch.index.build import images_to_add

    return images_to_add(Path(folder), exclude)


def make_plan(index, folder: Path, image_size: int, exclude=(), cache: KeyCache | None = None) -> SyncPlan:
    cache = cache or KeyCache()
    files = folder_photos(folder, exclude)
    paths = list(files)
    with ThreadPoolExecutor(max_workers=4) as pool:  # sha1 releases the GIL
        keys = list(pool.map(lambda p: cache.key(p, image_size), paths))
    plan = SyncPlan()
    live = [(row, r) for row, r in index.rows_and_records() if r.kind == "image"]
    plan_videos(plan, index, folder, cache, exclude)
    by_path = {r.path: (row, r) for row, r in live}
    by_key: dict[str, int] = {}
    for row, r in live:
        by_key.setdefault(r.key, row)
    for path, key in zip(paths, keys, strict=True):
        image_id = files[path]
        if key is None:
            plan.unreadable.append((path, "cannot read file"))
            continue
        old = by_path.get(path)
        if old is not None and old[1].key == key and old[1].id == image_id:
            plan.unchanged += 1
            continue
        if old is not None:
            plan.remove.append(old[1].id)
        if key in by_key:
            plan.move.append((image_id, path, key, by_key[key]))
        elif old is not None:
            plan.change.append((image_id, path, key))
        else:
            plan.add.append((image_id, path, key))
    gone = set(by_path) - set(files)
    plan.remove += [by_path[p][1].id for p in sorted(gone)]
    return plan


def plan_videos(plan: SyncPlan, index, folder: Path, cache: KeyCache, exclude=()) -> None:
    """The videos' part of the plan. A video is (re-)indexed whole when its path, id or content is new;
    its frames' features are cached by content (encoders/video.py), so a moved video decodes nothing
    and costs only the Fast tower over its frames. Its old moments are removed in the same write."""
    from vlsearch.index.build_video import find_videos
    from vlsearch.index.videos import read_videos

    files = find_videos(folder, exclude=exclude)
    live = {v.path: v for v in read_videos(index)}
    for path, video_id in files.items():
        key = cache.video_key(path)
        if key is None:
            plan.unreadable.append((path, "cannot read file"))
            continue
        old = live.get(path)
        if old is not None and old.key == key and old.id == video_id:
            plan.unchanged += 1
            continue
        if old is not None:
            plan.remove.append(old.id)
        plan.add_videos.append((video_id, path))
    plan.remove += [live[p].id for p in sorted(set(live) - set(files))]


def sync_folder(
    index_dir: str | Path,
    folder: str | Path,
    dry_run: bool = False,
    progress: bool = True,
    exclude=(),
    cache: KeyCache | None = None,
) -> SyncPlan:
    """Make the index at ``index_dir`` match ``folder`` (build it when there is none); returns the plan."""
    from vlsearch.index.build import build_index
    from vlsearch.index.update import sync_write

    index_dir, folder = Path(index_dir), Path(folder)
    if not (index_dir / "config.json").is_file():
        from vlsearch.index.build_video import find_videos

        plan = SyncPlan(add=[(i, p, "") for p, i in folder_photos(folder, exclude).items()])
        plan.add_videos = [(i, p) for p, i in find_videos(folder, exclude=exclude).items()]
        if not dry_run and plan:  # an empty folder: no index yet
            build_index(index_dir, folder, progress=progress, exclude=list(exclude))
        return plan
    plan, write = prepare_sync(index_dir, folder, dry_run, progress, exclude, cache)
    if write is not None:
        sync_write(index_dir, *write)
    return plan


def prepare_sync(index_dir: Path, folder: Path, dry_run=False, progress=True, exclude=(), cache=None):
    """The plan, and what its write needs (records, embeddings, photo metadata, ids to remove), or None
    when there is nothing to write. All model work happens here, before the write lock is taken."""
    from vlsearch.index.build import checked_model, photos_of
    from vlsearch.models.embedder import Embedder

    index = GalleryIndex.open(index_dir)
    try:
        net = checked_model(index)
        embedder = Embedder(net, progress=progress)
        plan = make_plan(index, folder, embedder.extractor.image_config.image_size, exclude, cache)
        if dry_run or not plan:
            return plan, None
        records: list[ImageRecord] = []
        parts: list[np.ndarray] = []
        todo = plan.add + plan.change
        if todo:
            report = ImageReport()
            emb, keys = embedder.embed_paths([p for _, p, _ in todo], report)
            ok = [n for n, k in enumerate(keys) if k is not None]
            records += [ImageRecord(todo[n][0], todo[n][1], keys[n]) for n in ok]
            parts.append(np.asarray(emb, np.float32))
            plan.unreadable += list(report.skipped)
        if plan.move:
            records += [ImageRecord(i, p, k) for i, p, k, _ in plan.move]
            rows = [r for _, _, _, r in plan.move]
            parts.append(np.asarray(index.embeddings[rows], np.float32))
        videos: list = []
        if plan.add_videos:
            from vlsearch.index.build_video import embed_videos

            report = ImageReport()
            todo = {p: i for i, p in plan.add_videos}
            moments, v_emb, videos = embed_videos(embedder, todo, len(records), report)
            records += moments
            parts.append(v_emb)
            plan.unreadable += list(report.skipped)
    finally:
        index.close()
    parts = [x for x in parts if len(x)]
    emb = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return plan, (records, emb, photos_of(records), list(plan.remove), videos)

"""The manifest of a segmented index, and the durable-write rules every index write follows.

Layout of a segmented index folder::

    config.json     the manifest: {"layout": "segments", "generation": G, "segments": [names, in row order],
                    "tombstones": {name: [deleted rows of that segment]}, "config": IndexConfig}
    seg-*/          immutable segments, each a complete gallery folder (index/gallery.py)
    .tmp-PID-*/     a segment being built by process PID (removed by the next write once PID is gone)

A write builds its segment aside (fsynced files and folder), then replaces the manifest: temp file, fsync,
rename, fsync the folder. The manifest is the only file that changes, so a reader sees the old state or
the new one. Writers hold ``write_lock`` from reading the manifest to replacing it; each write starts by
``clean``: it removes what killed writers left (temp folders of dead processes, segments no manifest
lists) and recovers an index a killed folder swap left aside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlsearch.config import check_stamp, stamp
from vlsearch.errors import IndexError_

LAYOUT = "segments"
OLD_LAYOUTS = ("sharded",)  # `vlsearch index --ray` before segments: the same folders, no tombstones
GALLERY_FILES = ("config.json", "images.faiss", "captions.faiss", "embeddings.npy", "meta.sqlite")


@dataclass
class Manifest:
    config: dict  # IndexConfig as a dict (n_images counts live rows)
    segments: list[str] = field(default_factory=list)
    tombstones: dict[str, list[int]] = field(default_factory=dict)
    generation: int = 0

    def dead(self, name: str) -> list[int]:
        return self.tombstones.get(name, [])

    def n_dead(self) -> int:
        return sum(len(v) for v in self.tombstones.values())


# -- durability -------------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file of a freshly written folder, then the folder itself, on disk."""
    for f in Path(path).iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def fault_point(step: str) -> None:
    """Fault injection for the crash tests: VLSEARCH_FAULT_AT=N kills this process at its N-th durable
    step (SIGKILL, nothing flushed or cleaned). Unset in normal use: one environment lookup."""
    at = os.environ.get("VLSEARCH_FAULT_AT")
    if not at:
        return
    global _steps
    _steps += 1
    if _steps >= int(at):
        os.kill(os.getpid(), 9)


_steps = 0


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Replace the manifest durably (temp file, fsync, rename, fsync folder)."""
    path = Path(path)
    data = {**stamp(), "layout": LAYOUT, **asdict(manifest)}
    tmp = path / f".config.json.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        fault_point("manifest written")
        os.fsync(f.fileno())
    fault_point("manifest synced")
    os.replace(tmp, path / "config.json")
    fault_point("manifest renamed")
    fsync_dir(path)


def read_manifest_meta(path: Path) -> dict | None:
    """The parsed config.json of an index folder, or None when there is none."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        meta = json.loads(cfg.read_text())
    except ValueError as e:
        raise IndexError_(
            f"index at {path} is corrupt (config.json: {e}); rebuild it with `vlsearch index`"
        ) from e
    check_stamp(meta, "index", path, IndexError_)
    return meta


def manifest_of(meta: dict) -> Manifest:
    """A manifest from a segmented (or old sharded) config.json."""
    names = list(meta.get("segments", meta.get("shards", [])))
    tomb = {k: sorted(int(r) for r in v) for k, v in (meta.get("tombstones") or {}).items() if v}
    return Manifest(dict(meta["config"]), names, tomb, int(meta.get("generation", 0)))


def is_segmented(meta: dict | None) -> bool:
    return bool(meta) and meta.get("layout") in (LAYOUT, *OLD_LAYOUTS)


def new_segment_name() -> str:
    """Unique without coordination and sortable by creation time."""
    return f"seg-{time.time_ns():016x}-{os.getpid()}"


def temp_dir(path: Path, what: str = "tmp") -> Path:
    """A folder for a write in progress, named after this process so ``clean`` knows when it is stale."""
    d = Path(path) / f".{what}-{os.getpid()}-{time.time_ns():x}"
    d.mkdir(parents=True)
    return d


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PID = re.compile(r"(?:building-|^\.tmp-|^\.compact-|^\.config\.json\.)(\d+)")


def _stale(name: str) -> bool:
    """A temp name holding a pid (``.tmp-PID-...``, ``.x.building-PID-...``) whose process is gone."""
    m = _PID.search(name)
    if m is None:
        return False
    pid = int(m.group(1))
    return pid != os.getpid() and not _pid_alive(pid)


def recover_swap(path: Path) -> None:
    """A writer killed between a folder swap's two renames left no index at ``path`` and the complete old
    one aside: put it back."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return
    old = sorted(path.parent.glob(f".{path.name}.old-*"))
    if old:
        old[-1].rename(path)
        fsync_dir(path.parent)


def clean(path: Path) -> list[str]:
    """Remove what killed writers left in and beside an index (call under the write lock); returns the
    names removed. Live writers' temp folders are kept."""
    path = Path(path)
    removed = []
    recover_swap(path)
    if path.parent.is_dir():
        for p in path.parent.glob(f".{path.name}.*"):
            if p.is_dir() and (".old-" in p.name or (".building-" in p.name and _stale(p.name))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    if not path.is_dir():
        return removed
    meta = read_manifest_meta(path)
    listed = set(manifest_of(meta).segments) if is_segmented(meta) else set()
    for p in path.iterdir():
        name = p.name
        if name.startswith((".tmp-", ".compact-")) or ".building-" in name:
            if _stale(name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(name)
        elif name.startswith(".config.json.") and name.endswith(".tmp") and _stale(name):
            p.unlink(missing_ok=True)
            removed.append(name)
        elif is_segmented(meta) and name.startswith("seg-") and name not in listed and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # written by a killed writer, or compacted away
            removed.append(name)
        elif is_segmented(meta) and name in GALLERY_FILES[1:]:
            p.unlink(missing_ok=True)  # the files of a plain index converted to segments
            removed.append(name)
    return removed

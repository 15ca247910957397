"""Video caption datasets: one JSON list of ``{"video": FILE, "caption": TEXT}`` entries, optionally with
``"start"``/``"end"`` seconds (the span the caption describes), next to a folder of videos. A video may
have one caption or many."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlsearch.errors import DataError


@dataclass
class VideoCaptionDataset:
    name: str
    video_paths: list[Path]
    video_ids: list[str]
    captions: list[str]
    caption_video: np.ndarray  # [C] index into video_paths
    spans: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [C, 2] seconds, nan if none

    @property
    def n_videos(self) -> int:
        return len(self.video_paths)

    def without_videos(self, drop: set[int]) -> VideoCaptionDataset:
        keep = [i for i in range(self.n_videos) if i not in drop]
        remap = {old: new for new, old in enumerate(keep)}
        rows = [c for c, v in enumerate(self.caption_video) if int(v) in remap]
        return VideoCaptionDataset(
            self.name,
            [self.video_paths[i] for i in keep],
            [self.video_ids[i] for i in keep],
            [self.captions[c] for c in rows],
            np.array([remap[int(self.caption_video[c])] for c in rows], dtype=np.int64),
            self.spans[rows] if len(rows) else np.zeros((0, 2)),
        )


def find_caption_json(root: Path) -> Path | None:
    """The JSON list of video captions in ``root`` (or ``root`` itself), if there is one."""
    if root.is_file():
        return root if root.suffix == ".json" and _is_video_list(root) else None
    for cand in sorted(root.glob("*.json")):
        if _is_video_list(cand):
            return cand
    return None


def _is_video_list(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return False
    return head.startswith("[") and '"video"' in head


def load_video_captions(path: str | Path) -> VideoCaptionDataset:
    """Read the JSON list; video files are looked up beside it (or in a ``videos/`` folder there)."""
    path = Path(path)
    json_path = find_caption_json(path) if path.is_dir() else path
    if json_path is None:
        raise DataError(f"no video caption list (JSON [{{'video': ..., 'caption': ...}}]) in {path}")
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path} is not a readable JSON list ({e})") from e
    if not isinstance(entries, list):
        raise DataError(f"{json_path}: expected a JSON list of {{'video', 'caption'}} objects")
    base = json_path.parent
    paths: dict[str, Path] = {}
    order: dict[str, int] = {}
    captions, cap_video, spans = [], [], []
    for n, e in enumerate(entries):
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("video"), str)
            or not isinstance(e.get("caption"), str)
        ):
            raise DataError(f"{json_path} entry {n}: needs string fields 'video' and 'caption'")
        name = e["video"]
        if name not in paths:
            cand = [base / name, base / "videos" / name]
            found = next((c for c in cand if c.is_file()), None)
            if found is None:
                continue  # missing files are dropped, as for photo datasets
            paths[name] = found.resolve()
        start, end = e.get("start"), e.get("end")
        if start is not None and end is not None and not float(end) > float(start) >= 0:
            raise DataError(f"{json_path} entry {n}: needs 0 <= start < end, not {start}..{end}")
        captions.append(e["caption"].strip())
        cap_video.append(order.setdefault(name, len(order)))
        spans.append(
            (float(start), float(end)) if start is not None and end is not None else (np.nan, np.nan)
        )
    if not paths:
        raise DataError(f"none of the videos listed in {json_path} were found beside it")
    return VideoCaptionDataset(
        json_path.stem,
        list(paths.values()),
        list(paths),
        captions,
        np.asarray(cap_video, dtype=np.int64),
        np.asarray(spans, dtype=np.float64).reshape(-1, 2),
    )

"""Videos in a gallery: find them in a folder, sample and embed their frames, and lay out one gallery row
per moment (appended after the photos, each video's moments contiguous and in time order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsearch.data.datasets import excluded, inside, skipped_name
from vlsearch.data.images import ImageReport
from vlsearch.data.video import VIDEO_EXTENSIONS, SamplingConfig
from vlsearch.encoders.video import videos_frames
from vlsearch.index.plain import ImageRecord
from vlsearch.index.videos import VideoRecord


def find_videos(source, follow_symlinks: bool = False, exclude=()) -> dict[str, str]:
    """A folder (recursively) or a file or a list of files -> {resolved path: id} of the video files;
    ids are paths relative to the folder, or file names. Hidden and OS files, ``exclude`` globs and
    links out of a folder: as for photos (``data.datasets.load_folder``)."""
    if source is None:
        return {}
    if isinstance(source, str | Path):
        p = Path(source)
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.suffix.lower() in VIDEO_EXTENSIONS
                and not any(skipped_name(part) for part in f.relative_to(p).parts)
                and not excluded(f.relative_to(p), exclude)
                and f.is_file()
                and (follow_symlinks or inside(f, p))
            )
            return {str(f.resolve()): str(f.relative_to(p)) for f in files}
        source = [p] if p.is_file() else []
    return {
        str(Path(f).resolve()): Path(f).name for f in source if Path(f).suffix.lower() in VIDEO_EXTENSIONS
    }


def moment_id(video_id: str, t: float) -> str:
    return f"{video_id}@{t:.2f}"


def embed_videos(
    embedder,
    videos: dict[str, str],
    first_row: int,
    report: ImageReport,
    sampling: SamplingConfig = SamplingConfig(),
) -> tuple[list[ImageRecord], np.ndarray, list[VideoRecord]]:
    """(moment records, their embeddings [n, dim], video records) for the readable videos, rows numbered
    from ``first_row``. Unreadable files go to ``report``."""
    paths = list(videos)
    frames = videos_frames(embedder.extractor, paths, sampling, report)
    records: list[ImageRecord] = []
    out: list[VideoRecord] = []
    keys: list[str] = []
    for path, vf in zip(paths, frames, strict=True):
        if vf is None:
            continue
        vid = videos[path]
        row = first_row + len(records)
        for (t0, t1), key in zip(vf.moments, vf.frame_keys, strict=True):
            records.append(ImageRecord(moment_id(vid, t0), path, key, "video", t0, t1, vid))
            keys.append(key)
        i = vf.info
        out.append(
            VideoRecord(
                vid,
                path,
                vf.key,
                i.duration,
                i.width,
                i.height,
                i.fps,
                i.rotation,
                i.size,
                i.captured,
                row,
                len(vf.times),
            )
        )
    emb = embedder.embed_keys(keys) if keys else np.zeros((0, embedder.dim), np.float32)
    return records, np.asarray(emb, np.float32), out

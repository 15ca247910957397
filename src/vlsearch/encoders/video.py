"""Backbone features of a video's sampled frames, cached per (video content, timestamp).

The frames go into the same image feature store as photos (key = hash of the file's content key and the
timestamp), and what the sampling chose (timestamps, metadata) goes into a small JSON beside the store, so
a second run over the same file decodes nothing and encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vlsearch.config import atomic_write_json
from vlsearch.data.images import ImageReport
from vlsearch.data.video import SamplingConfig, VideoInfo, moments_of, probe, sample_frames
from vlsearch.encoders.features import FeatureExtractor, file_key

BATCH = 32  # frames per backbone call, and the most decoded frames held at once (with one chunk below)
CHUNK = 256  # frames per feature-store chunk


def frame_key(video_key: str, t: float) -> str:
    return hashlib.sha1(f"video:{video_key}@{t:.3f}".encode()).hexdigest()


@dataclass
class VideoFrames:
    """One video's sampled frames: content key, metadata, timestamps and their feature keys."""

    path: str
    key: str
    info: VideoInfo
    times: list[float]
    frame_keys: list[str]
    note: str = ""  # e.g. decoded only part of a damaged file

    @property
    def moments(self) -> list[tuple[float, float]]:
        return moments_of(self.times, self.info.duration)


def _sidecar(fx: FeatureExtractor, sampling: SamplingConfig, key: str) -> Path:
    return Path(fx.images.root).parent.parent / "video" / fx.image_config.tag / sampling.tag / f"{key}.json"


def video_frames(
    fx: FeatureExtractor,
    path: str | Path,
    sampling: SamplingConfig = SamplingConfig(),
    report: ImageReport | None = None,
    bar=None,
) -> VideoFrames | None:
    """Sample, encode and cache one video's frames; None (and a line in ``report``) if unreadable."""
    report = report if report is not None else ImageReport()
    try:
        key = file_key(path)
    except OSError as e:
        report.add(path, f"cannot read file ({e.strerror or e})")
        return None
    side = _sidecar(fx, sampling, key)
    if side.is_file():
        meta = json.loads(side.read_text())
        if not fx.images.missing(meta["frame_keys"]):
            return VideoFrames(
                str(path), key, VideoInfo(**meta["info"]), meta["times"], meta["frame_keys"], meta["note"]
            )
    try:
        info = probe(path)
        times, keys = _encode(fx, path, key, sampling, bar)
    except ValueError as e:
        report.add(path, str(e))
        return None
    note = ""
    if info.duration > 0 and times[-1] < info.duration - max(2.0, 2.0 / sampling.fps):
        note = f"decoded only 0-{times[-1]:.1f} s of {info.duration:.1f} s (damaged or truncated file)"
        report.add(path, note + "; indexed what decoded")
    side.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(side, {"info": info.to_dict(), "times": times, "frame_keys": keys, "note": note})
    return VideoFrames(str(path), key, info, times, keys, note)


def _encode(fx: FeatureExtractor, path, key: str, sampling: SamplingConfig, bar) -> tuple[list, list]:
    """Stream the sampled frames through the backbone in small batches; frames already cached are not
    encoded again (a killed run resumes)."""
    times: list[float] = []
    keys: list[str] = []
    batch_t: list[float] = []
    batch: list[np.ndarray] = []
    pending_keys: list[str] = []
    pending: dict[str, list[np.ndarray]] = {"grid": [], "mid": []}

    def flush_batch():
        if not batch:
            return
        new = [(t, a) for t, a in zip(batch_t, batch, strict=True) if fx.images.missing([frame_key(key, t)])]
        if new:
            out = fx.image_backbone.encode_numpy(np.stack([a for _, a in new]))
            pending_keys.extend(frame_key(key, t) for t, _ in new)
            for name in pending:
                pending[name].extend(out[name])
        if bar is not None:
            bar.update(len(batch))
        batch.clear()
        batch_t.clear()

    def flush_chunk():
        if pending_keys:
            fx.images.put(list(pending_keys), {k: list(v) for k, v in pending.items()})
            pending_keys.clear()
            for v in pending.values():
                v.clear()

    for t, arr in sample_frames(path, sampling, fx.image_config.image_size):
        times.append(round(float(t), 3))
        keys.append(frame_key(key, times[-1]))
        batch_t.append(times[-1])
        batch.append(arr)
        if len(batch) >= BATCH:
            flush_batch()
            if len(pending_keys) >= CHUNK:
                flush_chunk()
    flush_batch()
    flush_chunk()
    return times, keys


def videos_frames(
    fx: FeatureExtractor,
    paths: list[str | Path],
    sampling: SamplingConfig = SamplingConfig(),
    report: ImageReport | None = None,
) -> list[VideoFrames | None]:
    """``video_frames`` for many files, with one progress bar counting frames."""
    import sys

    from tqdm import tqdm

    bar = tqdm(desc="video frames", unit="frame", disable=not (fx.progress and paths), file=sys.stderr)
    out = [video_frames(fx, p, sampling, report, bar) for p in paths]
    bar.close()
    return out


def info_dict(v: VideoFrames) -> dict:
    return {"path": v.path, "key": v.key, **asdict(v.info), "n_frames": len(v.times), "note": v.note}

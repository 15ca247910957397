"""Reading videos safely with PyAV (bundled FFmpeg): probe, stream-decode, sample frames, apply rotation.

Frames are decoded one at a time and only the sampled ones are kept, already squashed to the backbone's
input size, so memory stays bounded whatever the resolution or length. A file that cannot be decoded
(truncated, corrupt, empty, audio only) raises ValueError with a readable reason; callers report it and
go on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"}
MAX_VIDEO_PIXELS = 8192 * 8192  # refuse absurd frame sizes before decoding one


@dataclass(frozen=True)
class SamplingConfig:
    """How frames are picked: a regular rate plus frames where the picture changes (scene cuts)."""

    fps: float = 1.0  # regular samples per second
    max_frames: int = 600  # per video: beyond it the rate drops so the whole video is still covered
    scene_threshold: float = 0.08  # mean absolute change of a 32x32 grey thumbnail (0..1) that is a cut
    scene_check_s: float = 0.25  # how often the picture is compared for scene changes
    min_gap_s: float = 0.4  # no two samples closer than this

    @property
    def tag(self) -> str:
        return f"fps{self.fps:g}-max{self.max_frames}-sc{self.scene_threshold:g}-{self.scene_check_s:g}-{self.min_gap_s:g}"


@dataclass
class VideoInfo:
    duration: float  # seconds
    width: int  # displayed (after rotation)
    height: int
    fps: float
    rotation: int  # degrees the picture is turned (counter-clockwise) for display
    size: int  # bytes
    captured: str | None  # creation_time from the container, if any
    codec: str

    def to_dict(self) -> dict:
        return asdict(self)


def _open(path):
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ValueError(f"not a readable video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream (audio only?)")
    return container


def _rotation(stream, frame=None) -> int:
    """Degrees counter-clockwise the picture is turned for display: the display matrix (as PyAV reports
    it), else the old 'rotate' tag (which counts clockwise)."""
    rot = None
    if frame is not None:
        rot = getattr(frame, "rotation", None)
    if not rot:
        tag = stream.metadata.get("rotate")
        if tag:
            try:
                rot = -int(tag)
            except ValueError:
                rot = 0
    return int(round((rot or 0) / 90.0)) * 90 % 360


def probe(path: str | Path) -> VideoInfo:
    """Container-level facts, without decoding the picture (except one frame for the rotation)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty file")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > MAX_VIDEO_PIXELS:
            raise ValueError(f"video is {w}x{h} pixels; the limit is {MAX_VIDEO_PIXELS // 1_000_000} Mpx")
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1e6
        rot = _rotation(stream)
        if not rot:  # the display matrix is side data that PyAV shows on decoded frames
            try:
                frame = next(container.decode(stream), None)
                rot = _rotation(stream, frame) if frame is not None else 0
            except Exception:  # noqa: BLE001 - an undecodable first frame shows in sample_frames
                rot = 0
        if w and h and rot in (90, 270):
            w, h = h, w
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        captured = container.metadata.get("creation_time") or stream.metadata.get("creation_time")
        return VideoInfo(duration, w, h, fps, rot, size, captured, stream.codec_context.name)
    finally:
        container.close()


def _thumb(frame) -> np.ndarray:
    return frame.reformat(width=32, height=32, format="gray").to_ndarray().astype(np.float32) / 255.0


def _rotate(arr: np.ndarray, degrees: int) -> np.ndarray:
    # both count counter-clockwise
    return np.ascontiguousarray(np.rot90(arr, k=degrees // 90)) if degrees else arr


def sample_frames(
    path: str | Path, config: SamplingConfig = SamplingConfig(), size: int = 224
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (timestamp s, [size, size, 3] uint8) for the sampled frames, in time order, streaming.

    A regular frame every max(1/fps, duration/max_frames) seconds, plus the first frame after a scene
    change (checked every ``scene_check_s``). A file that breaks mid-way yields what decoded before the
    damage, then stops; a file where nothing decodes raises ValueError.
    """
    import av

    info = probe(path)
    interval = 1.0 / config.fps
    if info.duration > 0:
        interval = max(interval, info.duration / max(1, config.max_frames))
    container = _open(path)
    yielded = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        next_regular = 0.0
        next_check = 0.0
        last_sample = -math.inf
        last_thumb = None
        t0 = start_offset(stream)
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = max(0.0, frame.time - t0)
                regular = t >= next_regular - 1e-6
                if regular:  # the regular grid is never shifted by scene-change samples
                    while next_regular <= t + 1e-6:
                        next_regular += interval
                take = regular
                if t >= next_check - 1e-6:
                    thumb = _thumb(frame)
                    if last_thumb is not None and t - last_sample >= config.min_gap_s:
                        if float(np.abs(thumb - last_thumb).mean()) >= config.scene_threshold:
                            take = True
                    last_thumb = thumb
                    next_check = t + config.scene_check_s
                if take and t - last_sample >= min(config.min_gap_s, interval) - 1e-6:
                    arr = frame.reformat(width=size, height=size, format="rgb24").to_ndarray()
                    yield t, _rotate(arr, _rotation(stream, frame))
                    yielded += 1
                    last_sample = t
                    if yielded >= config.max_frames * 2:  # scene cuts included: a hard bound
                        break
        except (av.FFmpegError, EOFError) as e:
            if not yielded:
                raise ValueError(f"not a decodable video ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if not yielded:
        raise ValueError("no decodable video frames")


def moments_of(times: list[float], duration: float) -> list[tuple[float, float]]:
    """Each sampled frame stands for the time until the next one: [(start, end)] seconds."""
    end = max(duration, times[-1] if times else 0.0)
    out = []
    for i, t in enumerate(times):
        nxt = times[i + 1] if i + 1 < len(times) else max(end, t + 1e-3)
        out.append((float(t), float(nxt)))
    return out


def start_offset(stream) -> float:
    """Timestamps are kept from the stream's start, as a player's currentTime counts them."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return max(0.0, float(stream.start_time * stream.time_base))


def frame_at(path: str | Path, t: float, size: int | None = None) -> np.ndarray:
    """The decoded frame shown at time ``t`` (a thumbnail of a moment), rotation applied."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        t = max(0.0, t) + start_offset(stream)
        target = int(t / float(stream.time_base)) if stream.time_base else 0
        container.seek(target, stream=stream, backward=True)
        best = None
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            if best is None or frame.time <= t + 1e-3:
                best = frame
            if frame.time >= t - 1e-3:
                break
        if best is None:
            raise ValueError("no decodable frame at that time")
        if size:
            arr = best.reformat(width=size, height=size, format="rgb24").to_ndarray()
        else:
            arr = best.to_ndarray(format="rgb24")
        return _rotate(arr, _rotation(stream, best))
    finally:
        container.close()

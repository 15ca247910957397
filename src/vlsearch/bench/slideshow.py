"""Test videos made from real photos: slideshows (each photo held 2-4 s, cross-faded into the next), so
the time span of every photo's captions is known. Used by the tests and by the video bench and eval."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Slide:
    photo: str  # source photo path
    start: float  # span of the photo's captions: from the middle of the fade in ...
    end: float  # ... to the middle of the fade out


def _load(path: Path, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.uint8)


def write_slideshow(
    photos: list[Path],
    out: Path,
    holds: list[float] | None = None,
    fade: float = 0.5,
    fps: int = 10,
    size: tuple[int, int] = (320, 240),
    seed: int = 0,
    rotation: int = 0,
) -> list[Slide]:
    """Write an H.264 video of the photos (VP9 for .webm); return each photo's (start, end) seconds."""
    import av

    rng = np.random.default_rng(seed)
    holds = holds or [float(rng.uniform(2.0, 4.0)) for _ in photos]
    w, h = size
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    slides, t = [], 0.0
    with av.open(str(tmp), "w") as container:
        webm = out.suffix.lower() == ".webm"
        stream = container.add_stream("libvpx-vp9" if webm else "libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = (
            {"deadline": "realtime", "cpu-used": "8"} if webm else {"preset": "ultrafast", "crf": "23"}
        )
        if rotation:
            stream.set_display_rotation(rotation)
        images = [_load(p, w, h) for p in photos]
        n_frame = 0
        for i, img in enumerate(images):
            hold = holds[i]
            slides.append(Slide(str(photos[i]), max(0.0, t - fade / 2 if i else 0.0), 0.0))
            n = int(round(hold * fps))
            nf = int(round(fade * fps)) if i + 1 < len(images) else 0
            for j in range(n):
                pic = img
                if j >= n - nf:  # cross-fade into the next photo over the last `fade` seconds
                    a = (j - (n - nf) + 1) / (nf + 1)
                    pic = ((1 - a) * img + a * images[i + 1].astype(np.float32)).clip(0, 255).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(pic, format="rgb24")
                frame.pts = n_frame
                n_frame += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
            t += n / fps
            slides[-1].end = t - (nf / fps) / 2 if nf else t
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(out)
    return slides


def write_caption_json(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps(entries, indent=1))

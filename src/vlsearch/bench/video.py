"""Video rows of `vlsearch bench`, and the slideshow datasets the video evaluation runs on.

Rows: video indexing throughput at 1 frame/s (frames/s and seconds of video per second, beside the photo
figure, on the same photos), index and feature-cache bytes per hour of video, and the peak RSS of indexing
one high-resolution video (in a child process, so nothing else counts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from vlsearch.bench.slideshow import write_caption_json, write_slideshow
from vlsearch.data import load_dataset
from vlsearch.data.images import ImageReport
from vlsearch.data.video import probe
from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.encoders.features import FeatureExtractor
from vlsearch.encoders.video import videos_frames
from vlsearch.eval.metrics import retrieval_metrics
from vlsearch.index.build_video import embed_videos
from vlsearch.index.plain import IndexConfig, write_gallery
from vlsearch.models.embed import embed_features
from vlsearch.models.embedder import Embedder
from vlsearch.models.registry import load_model


def dev_photos(data_root=None) -> list:
    """(photo path, its captions) of the Flickr8k dev split, in split order."""

    ds = load_dataset(data_root, "dev")
    caps = ds.image_captions()
    return [(ds.image_paths[i], [ds.captions[c] for c in caps[i]]) for i in range(ds.n_images)]


def build_gallery(out: Path, photos: list, per_video: int, size=(320, 240), seed: int = 0) -> Path:
    """Slideshows of ``per_video`` photos each and the caption list (each caption with its photo's span)."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    entries = []
    for v in range(0, len(photos) - per_video + 1, per_video):
        group = photos[v : v + per_video]
        name = f"slideshow-{v // per_video:04d}.mp4"
        target = out / "videos" / name
        slides = write_slideshow([p for p, _ in group], target, size=size, seed=seed + v)
        for (_, caps), s in zip(group, slides, strict=True):
            entries += [{"video": name, "caption": c, "start": s.start, "end": s.end} for c in caps]
    write_caption_json(out / "captions.json", entries)
    return out


def build_eval_sets(
    out: Path, data_root=None, n_videos: int = 200, per_video: int = 5, long_photos: int = 50
):
    """The two datasets of the README's video section: ``long/`` (one slideshow of the first
    ``long_photos`` dev photos) and ``gallery/`` (``n_videos`` slideshows of ``per_video`` dev photos)."""
    photos = dev_photos(data_root)
    build_gallery(Path(out) / "long", photos[:long_photos], long_photos)
    build_gallery(Path(out) / "gallery", photos[: n_videos * per_video], per_video)


# -- bench rows ---------------------------------------------------------------------------------------------
RSS_SCRIPT = """
import json, resource, sys, time
from pathlib import Path
from vlsearch.encoders.features import FeatureExtractor
from vlsearch.encoders.video import video_frames
def hwm():  # VmHWM, not ru_maxrss: that one keeps the forking parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fx = FeatureExtractor(root=Path(sys.argv[2]), progress=False)
_ = fx.image_backbone
base = hwm()
t0 = time.perf_counter()
vf = video_frames(fx, sys.argv[1])
print(json.dumps({"baseline_kb": base, "peak_kb": hwm(), "frames": len(vf.times), "seconds": time.perf_counter() - t0}))
"""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run(data, embedder, work: Path, quick: bool, photo_images_per_s: float | None = None) -> dict:
    """All video rows. ``data``: the bench's BenchData (its dataset's photos are used)."""

    work = Path(work) / "video"
    work.mkdir(parents=True, exist_ok=True)
    n_photos = 6 if quick else 40
    photos = [Path(p) for p in data.dataset.image_paths[:n_photos]]
    clips = []
    for i in range(0, n_photos, 2 if quick else 10):
        clip = work / f"clip-{i}.mp4"
        write_slideshow(photos[i : i + (2 if quick else 10)], clip, size=(640, 480), seed=i)
        clips.append(clip)

    seconds = sum(probe(c).duration for c in clips)
    fresh = FeatureExtractor(root=work / "cache", progress=False)
    fresh._image_backbone = embedder.extractor.image_backbone  # loaded once; the cache is what's fresh
    t0 = time.perf_counter()
    frames = videos_frames(fresh, clips)
    t_video = time.perf_counter() - t0
    n_frames = sum(len(f.times) for f in frames)
    t0 = time.perf_counter()
    fresh.image_keys(photos)
    t_photo = time.perf_counter() - t0
    t0 = time.perf_counter()
    videos_frames(fresh, clips)
    t_rerun = time.perf_counter() - t0
    # index bytes per hour of video: the gallery rows, vectors and metadata of these clips alone
    emb = Embedder(embedder.model, fresh, progress=False)
    moments, m_emb, vrecs = embed_videos(emb, {str(c): c.name for c in clips}, 0, ImageReport())
    cfg = IndexConfig("bench", "fast", "-", emb.dim, "flat", "", "")
    write_gallery(work / "index", cfg, moments, m_emb, videos=vrecs)
    hours = seconds / 3600
    rows = {
        "video_indexing": {
            "clips": len(clips),
            "video_seconds": seconds,
            "frames": n_frames,
            "frames_per_s": n_frames / t_video,
            "video_seconds_per_s": seconds / t_video,
            "note": "640x480 H.264 slideshows at 10 fps, sampled at 1 frame/s + scene changes; decode, "
            "sample, backbone features, cache",
        },
        "photo_indexing": {
            "photos": len(photos),
            "images_per_s": len(photos) / t_photo,
            "bench_encoder_images_per_s": photo_images_per_s,
        },
        "rerun_seconds": t_rerun,
        "index_bytes_per_hour": _dir_bytes(work / "index") / hours,
        "feature_cache_bytes_per_hour": _dir_bytes(work / "cache" / "image") / hours,
    }
    rows["peak_rss"] = peak_rss(work, quick, photos)
    return rows


def peak_rss(work: Path, quick: bool, photos: list) -> dict:
    """Index one high-resolution video in a child process: its peak RSS over the baseline (backbone
    loaded), which stays flat however long the video is because frames are streamed."""
    size = (1920, 1080) if quick else (3840, 2160)
    n = 2 if quick else 20  # photos held 3 s each
    clip = work / f"hires-{size[0]}x{size[1]}.mp4"
    write_slideshow(photos[:n], clip, holds=[3.0] * n, fps=5, size=size)
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(clip), str(work / "rss-cache")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    r = json.loads(out.stdout.strip().splitlines()[-1])

    info = probe(clip)
    return {
        "resolution": f"{info.width}x{info.height}",
        "video_seconds": info.duration,
        "frames_sampled": r["frames"],
        "baseline_mb": r["baseline_kb"] / 1024,
        "peak_mb": r["peak_kb"] / 1024,
        "over_baseline_mb": (r["peak_kb"] - r["baseline_kb"]) / 1024,
        "seconds": r["seconds"],
    }


def markdown(v: dict) -> str:
    vi, ph, rss = v["video_indexing"], v["photo_indexing"], v.get("peak_rss", {})
    lines = [
        "",
        "### Video",
        "",
        "| | figure |",
        "|---|---|",
        f"| video indexing at 1 frame/s | {vi['frames_per_s']:.1f} frames/s, {vi['video_seconds_per_s']:.2f} s of video per s "
        f"({vi['frames']} frames of {vi['video_seconds']:.0f} s) |",
        f"| photo indexing, same photos | {ph['images_per_s']:.1f} images/s |",
        f"| re-run over the same videos | {v['rerun_seconds']:.2f} s (everything cached) |",
        f"| index per hour of video | {v['index_bytes_per_hour'] / 1e6:.2f} MB (feature cache {v['feature_cache_bytes_per_hour'] / 1e6:.0f} MB) |",
    ]
    if "peak_mb" in rss:
        lines.append(
            f"| peak RSS indexing a {rss['resolution']} video of {rss['video_seconds']:.0f} s | {rss['peak_mb']:.0f} MB "
            f"({rss['over_baseline_mb']:.0f} MB over the loaded backbone) |"
        )
    return "\n".join(lines) + "\n"


def photo_baseline(n_photos: int = 50, model: str = "fast", data_root=None) -> dict:
    """Image-level recall of the first ``n_photos`` dev photos searched as photos (the reference the
    long slideshow's moment recall is held against)."""

    ds = load_dataset(data_root, "dev").subset(range(n_photos))
    net, _, _ = load_model(model)
    feats = DatasetFeatures.load(ds, progress=False)
    img, txt = embed_features(net, feats)
    return retrieval_metrics(txt @ img.T, feats.caption_image.numpy())


if __name__ == "__main__":  # python -m vlsearch.bench.video build OUT | baseline [N]
    if sys.argv[1] == "build":
        build_eval_sets(Path(sys.argv[2]))
    else:
        print(json.dumps(photo_baseline(int(sys.argv[2]) if len(sys.argv) > 2 else 50)))

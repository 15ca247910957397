"""Videos: decoding and sampling real mp4 files made from Flickr8k photos, bad inputs, indexing beside
photos, every search direction, the CLI, the caption-dataset evaluation, and old indexes still opening."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FLICKR, link_photo, need_data

PHOTOS = FLICKR / "Flicker8k_Dataset"


def photos(n: int, start: int = 0) -> list[Path]:
    need_data()
    names = (FLICKR / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()
    return [PHOTOS / x for x in names[start : start + n]]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two slideshows (3 and 2 photos), a rotated one, a variable-frame-rate one, and bad files."""
    from vlsearch.bench.slideshow import write_slideshow

    root = tmp_path_factory.mktemp("clips")
    out = {"root": root}
    out["a"] = (root / "a.mp4", write_slideshow(photos(3), root / "a.mp4", seed=1))
    out["b"] = (root / "b.mp4", write_slideshow(photos(2, 3), root / "b.mp4", seed=2))
    return out


def test_sampling_rate_scene_changes_and_moments(clips):
    from vlsearch.data.video import SamplingConfig, moments_of, probe, sample_frames

    path, slides = clips["a"]
    info = probe(path)
    assert abs(info.duration - slides[-1].end) < 0.2 and (info.width, info.height) == (320, 240)
    frames = list(sample_frames(path))
    times = [t for t, _ in frames]
    assert all(a.shape == (224, 224, 3) and a.dtype == np.uint8 for _, a in frames)
    assert times == sorted(times) and times[0] == 0.0
    regular = np.arange(0, info.duration, 1.0)
    near = [min(abs(t - r) for t in times) for r in regular]
    assert max(near) < 0.41  # 1 frame/s (a scene-change frame just before a tick stands for it) ...
    assert len(times) > len(regular)  # ... plus scene changes at the cross-fades
    spans = moments_of(times, info.duration)
    assert spans[0][0] == 0.0 and abs(spans[-1][1] - info.duration) < 1e-6
    assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    capped = list(sample_frames(path, SamplingConfig(fps=1.0, max_frames=3, scene_threshold=2.0)))
    assert len(capped) <= 4 and capped[-1][0] > info.duration / 2  # the cap spreads, not truncates


def test_rotation_metadata_is_applied(tmp_path):
    from PIL import Image

    from vlsearch.bench.slideshow import write_slideshow
    from vlsearch.data.video import probe, sample_frames

    src = photos(1)
    write_slideshow(src * 2, tmp_path / "r.mp4", holds=[1.0, 1.0], rotation=90)
    info = probe(tmp_path / "r.mp4")
    assert info.rotation == 90 and (info.width, info.height) == (240, 320)
    _, frame = next(sample_frames(tmp_path / "r.mp4"))
    photo = np.asarray(Image.open(src[0]).convert("RGB").resize((320, 240)))

    def err(k):
        ref = np.asarray(Image.fromarray(np.ascontiguousarray(np.rot90(photo, k))).resize((224, 224)))
        return np.abs(ref.astype(float) - frame).mean()

    assert err(1) < 10 < min(err(0), err(-1), err(2))  # displayed as the player shows it


def test_variable_frame_rate_and_large_resolution(tmp_path):
    import av

    from vlsearch.data.video import probe, sample_frames

    img = np.asarray(__import__("PIL.Image").Image.open(photos(1)[0]).convert("RGB").resize((160, 120)))
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as c:  # frames at irregular times (ms time base)
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt, s.time_base = (
            160,
            120,
            "yuv420p",
            __import__("fractions").Fraction(1, 1000),
        )
        s.codec_context.time_base = s.time_base
        for pts in [0, 40, 900, 950, 2600, 2700, 4100, 5300]:
            f = av.VideoFrame.from_ndarray(np.roll(img, pts // 10, axis=1).copy(), format="rgb24")
            f.pts = pts
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    times = [t for t, _ in sample_frames(path)]
    assert times[0] == 0.0 and times == sorted(times) and times[-1] >= 4.0
    assert all(b - a >= 0.4 - 1e-6 for a, b in zip(times, times[1:], strict=False))
    from vlsearch.bench.slideshow import write_slideshow

    big = tmp_path / "big.mp4"
    write_slideshow(photos(2), big, holds=[1.0, 1.0], fps=2, size=(4096, 2160))
    assert probe(big).width == 4096
    assert [a.shape for _, a in sample_frames(big)][0] == (224, 224, 3)


def bad_files(root: Path) -> dict[str, Path]:
    """Zero length, random bytes, a truncated mp4, audio only."""
    import av

    from vlsearch.bench.slideshow import write_slideshow

    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.mp4").write_bytes(b"")
    (root / "noise.mov").write_bytes(
        np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    )
    full = root / ".full.mp4"
    write_slideshow(photos(2, 10), full, holds=[2.0, 2.0])
    data = full.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    full.unlink()
    with av.open(str(root / "audio.m4v"), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    return {p.stem: p for p in root.iterdir() if not p.name.startswith(".")}


def test_bad_videos_are_reported_never_a_crash(tmp_path):
    from vlsearch.data.images import ImageReport
    from vlsearch.data.video import probe, sample_frames
    from vlsearch.encoders.features import FeatureExtractor
    from vlsearch.encoders.video import videos_frames

    bad = bad_files(tmp_path / "bad")
    for path in bad.values():
        with pytest.raises(ValueError):
            probe(path)
            list(sample_frames(path))
    report = ImageReport()
    fx = FeatureExtractor(progress=False)
    assert videos_frames(fx, list(bad.values()), report=report) == [None] * len(bad)
    reasons = dict(report.skipped)
    assert set(reasons) == {str(p) for p in bad.values()}
    assert "empty" in reasons[str(bad["empty"])] and "no video stream" in reasons[str(bad["audio"])]


@pytest.fixture(scope="module")
def mixed_index(tiny_fast_checkpoint, clips, tmp_path_factory):
    """A folder of 3 photos, the two slideshows and the bad files, indexed with `vlsearch index`."""
    from vlsearch.index.build import build_index

    folder = tmp_path_factory.mktemp("mixed") / "media"
    folder.mkdir()
    for p in photos(3, 20):
        link_photo(p, folder / p.name)
    (folder / "clips").mkdir()
    for key in ("a", "b"):
        link_photo(clips[key][0], folder / "clips" / f"{key}.mp4")
    bad_files(folder / "bad")
    out = folder.parent / "idx"
    path, report = build_index(out, folder, progress=False)
    return path, report, folder


def test_index_holds_photos_and_video_moments(mixed_index, clips):
    from vlsearch.index.gallery import GalleryIndex, read_records
    from vlsearch.index.videos import read_videos

    path, report, _ = mixed_index
    assert {Path(p).name for p, _ in report.skipped} == {
        "empty.mp4",
        "noise.mov",
        "truncated.mp4",
        "audio.m4v",
    }
    idx = GalleryIndex.open(path)
    recs = read_records(idx)
    videos = {v.id: v for v in read_videos(idx)}
    assert set(videos) == {"clips/a.mp4", "clips/b.mp4"}
    assert sum(r.kind == "image" for r in recs) == 3
    a = videos["clips/a.mp4"]
    assert abs(a.duration - clips["a"][1][-1].end) < 0.2 and (a.width, a.height, a.rotation) == (320, 240, 0)
    rows = recs[a.first_row : a.first_row + a.n_rows]
    assert all(r.kind == "video" and r.video == a.id for r in rows)
    assert [r.t_start for r in rows] == sorted(r.t_start for r in rows) and rows[0].t_start == 0.0


def test_rerun_recomputes_nothing(mixed_index, clips, monkeypatch):
    import vlsearch.encoders.video as ev
    from vlsearch.encoders.features import FeatureExtractor

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(ev, "sample_frames", boom)
    vf = ev.video_frames(FeatureExtractor(progress=False), clips["a"][0])
    assert vf is not None and len(vf.frame_keys) == len(vf.times) > 5


def test_search_directions(mixed_index, clips):
    import vlsearch

    path, _, folder = mixed_index
    engine = vlsearch.load(path)
    assert engine.has_videos
    # image-to-video: the second photo of slideshow a finds its moment
    photo = photos(3)[1]
    span = clips["a"][1][1]
    moments = engine.search_moments(photo, k=3, by_image=True).hits
    best = moments[0]
    assert best.kind == "video" and best.id == "clips/a.mp4"
    assert best.t_start < span.end and best.t_end > span.start and span.start <= best.t_frame <= span.end
    assert len({(h.id, h.t_start) for h in moments}) == len(moments)  # distinct moments
    vids = engine.search_videos(photo, k=5).hits
    assert [h.id for h in vids][:1] == ["clips/a.mp4"] and len(vids) == 2
    for how in ("max", "topn"):
        assert engine.search_videos("a dog runs", k=2, aggregate=how).hits[0].kind == "video"
    mixed = engine.search("a dog runs on the grass", k=10).hits
    kinds = [h.kind for h in mixed]
    assert kinds.count("video") == 2 and kinds.count("image") == 3  # one hit per video
    d = next(h for h in mixed if h.kind == "video").to_dict()
    assert {"t_start", "t_end", "kind"} <= set(d)
    assert "kind" not in next(h for h in mixed if h.kind == "image").to_dict()
    sim = engine.search_image(photo, k=10).hits
    assert sim[0].kind == "video" and sim[0].id == "clips/a.mp4"


def test_cli_prints_moments(mixed_index):
    path, _, _ = mixed_index
    cmd = [
        sys.executable,
        "-m",
        "vlsearch.cli",
        "search",
        "a dog",
        "--index",
        str(path),
        "--moments",
        "--k",
        "3",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 3 and all(" @ 0:" in ln and ".mp4" in ln for ln in lines)
    js = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    hit = json.loads(js.stdout)["results"][0]
    assert hit["kind"] == "video" and hit["t_end"] > hit["t_start"] >= 0


def test_add_videos_and_photos_keeps_both(mixed_index, tmp_path):
    import shutil

    from vlsearch.bench.slideshow import write_slideshow
    from vlsearch.index.build import add_to_index
    from vlsearch.index.gallery import GalleryIndex, read_records
    from vlsearch.index.videos import read_videos

    path, _, _ = mixed_index
    copy = tmp_path / "idx"
    shutil.copytree(path, copy)
    clip = tmp_path / "new" / "c.mp4"
    write_slideshow(photos(2, 30), clip, holds=[2.0, 2.0])
    n, _ = add_to_index(copy, [clip, photos(1, 40)[0]], progress=False)
    idx = GalleryIndex.open(copy)
    videos = read_videos(idx)
    recs = read_records(idx)
    assert [v.id for v in videos] == ["clips/a.mp4", "clips/b.mp4", "c.mp4"]
    c = videos[-1]
    assert n == 1 + c.n_rows and all(r.video == "c.mp4" for r in recs[c.first_row : c.first_row + c.n_rows])


def test_old_photo_index_still_opens(tiny_fast_checkpoint, mini_flickr, tmp_path):
    """An index written before videos (images table of 4 columns, no videos table) opens and searches."""
    import vlsearch
    from vlsearch.index.build import build_index

    path, _ = build_index(tmp_path / "old", mini_flickr, "dev", progress=False)
    db = sqlite3.connect(path / "meta.sqlite")
    db.executescript(
        "CREATE TABLE old AS SELECT row, id, path, key FROM images; DROP TABLE images; DROP TABLE videos;"
        "ALTER TABLE old RENAME TO images;"
    )
    db.commit()
    db.close()
    engine = vlsearch.load(path)
    assert not engine.has_videos
    hits = engine.search("a dog", k=3).hits
    assert len(hits) == 3 and all(h.kind == "image" for h in hits)


def test_video_caption_dataset_eval(tiny_fast_checkpoint, tmp_path):
    """The JSON caption format (one or many captions per video, spans optional) through `vlsearch eval`."""
    from vlsearch.bench.video import build_gallery, dev_photos
    from vlsearch.data.video_dataset import load_video_captions

    root = build_gallery(tmp_path / "vids", dev_photos()[:6], 3)
    entries = json.loads((root / "captions.json").read_text())
    entries.append({"video": "missing.mp4", "caption": "dropped"})
    entries[0] = {k: v for k, v in entries[0].items() if k not in ("start", "end")}
    (root / "captions.json").write_text(json.dumps(entries))
    ds = load_video_captions(root)
    assert ds.n_videos == 2 and len(ds.captions) == 30 and np.isnan(ds.spans[0]).all()
    out = subprocess.run(
        [sys.executable, "-m", "vlsearch.cli", "eval", "--data-root", str(root), "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["n_videos"] == 2 and r["n_captions"] == 30 and r["moments"]["n_queries"] == 29
    assert set(r["aggregates"]) == {"max", "topn"} and 0 <= r["t2v"]["r1"] <= 100
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "c.json").write_text('[{"video": 3}]')
    out = subprocess.run(
        [sys.executable, "-m", "vlsearch.cli", "eval", "--data-root", str(bad)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "video" in out.stderr


def test_moment_aggregation_and_spans():
    from vlsearch.search.video import VideoLayout, aggregate, grow_span, iou, top_moments

    s = np.array([0.1, 0.1, 0.5, 0.55, 0.5, 0.1, 0.9, 0.1])
    assert aggregate(s, "max") == pytest.approx(0.9)
    assert aggregate(s, "topn") < 0.55  # one lucky frame counts less when smoothed
    assert grow_span(s, 3) == (2, 4)
    lay = VideoLayout(["v"], ["v.mp4"], np.array([0]), np.array([8]), np.arange(8.0), np.arange(8.0) + 1)
    top = top_moments(lay, s, 3)
    assert [(m.t_start, m.t_end) for m in top[:2]] == [(6.0, 7.0), (2.0, 5.0)]
    assert iou((2.0, 5.0), (2.0, 4.0)) == pytest.approx(2 / 3)


def test_video_bench_rows(tiny_fast_checkpoint, tmp_path):
    from types import SimpleNamespace

    from vlsearch.bench.video import markdown, run
    from vlsearch.models.registry import load_model
    from vlsearch.search.embedder import Embedder

    data = SimpleNamespace(dataset=SimpleNamespace(image_paths=photos(6, 70)))
    rows = run(
        data, Embedder(load_model("fast")[0], progress=False), tmp_path, quick=True, photo_images_per_s=50.0
    )
    vi = rows["video_indexing"]
    assert vi["frames"] > 0 and vi["frames_per_s"] > 0 and vi["video_seconds_per_s"] > 0
    assert rows["index_bytes_per_hour"] > 0 and rows["photo_indexing"]["images_per_s"] > 0
    rss = rows["peak_rss"]
    assert rss["resolution"] == "1920x1080" and rss["peak_mb"] >= rss["baseline_mb"] > 0, rss
    table = markdown(rows)
    assert "frames/s" in table and "peak RSS" in table

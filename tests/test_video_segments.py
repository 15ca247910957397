"""Videos in a segmented index (issue 15): a folder of real photos and real mp4 clips kept in sync (new,
moved, copied, edited, deleted clips), videos removed by id, compaction, and a dataset index whose
deleted images' captions stop being found. Every check compares against a fresh build of the folder."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import assert_same_images, link_photo
from tests.test_video import photos
from vlsearch.cli import main

pytestmark = pytest.mark.usefixtures("tiny_fast_checkpoint")


def _videos(path):
    """{id: (path, content key, [moment ids in row order])} of an index's live videos."""
    from vlsearch.index.gallery import GalleryIndex
    from vlsearch.index.videos import read_videos

    index = GalleryIndex.open(path)
    try:
        out = {}
        for v in read_videos(index):
            recs = index.records(range(v.first_row, v.first_row + v.n_rows))
            assert all(r.kind == "video" and r.video == v.id and r.path == v.path for r in recs), v.id
            out[v.id] = (v.path, v.key, [r.id for r in recs])
        return out
    finally:
        index.close()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    from vlsearch.bench.slideshow import write_slideshow

    root = tmp_path_factory.mktemp("seg-clips")
    a, b, c = root / "a.mp4", root / "b.mp4", root / "c.mp4"
    write_slideshow(photos(2, 50), a, holds=[2.0, 2.0], seed=3)
    write_slideshow(photos(2, 52), b, holds=[2.0, 2.0], seed=4)
    write_slideshow(photos(2, 54), c, holds=[2.0, 2.0], seed=5)
    return {"a": a, "b": b, "c": c}


def test_sync_remove_and_compact_a_folder_of_photos_and_videos(clip_files, tmp_path, capsys):
    import vlsearch
    from vlsearch.index.build import build_index
    from vlsearch.index.sync import sync_folder
    from vlsearch.index.update import describe, live_state

    folder = tmp_path / "Media"
    (folder / "clips").mkdir(parents=True)
    for p in photos(3, 60):
        link_photo(p, folder / p.name)
    shutil.copy(clip_files["a"], folder / "clips" / "a.mp4")
    shutil.copy(clip_files["b"], folder / "clips" / "b.mp4")
    out = tmp_path / "idx"
    build_index(out, folder, progress=False)
    assert set(_videos(out)) == {"clips/a.mp4", "clips/b.mp4"}

    # a day of changes: a new clip, a moved one, a copy, an edited one, OS litter that is no video
    shutil.copy(clip_files["c"], folder / "c.mp4")
    (folder / "trips").mkdir()
    (folder / "clips" / "a.mp4").rename(folder / "trips" / "a-moved.mp4")
    shutil.copy(folder / "trips" / "a-moved.mp4", folder / "trips" / "a-copy.mp4")
    shutil.copy(clip_files["c"], folder / "clips" / "b.mp4")  # edited in place: other content
    (folder / "@eaDir").mkdir()
    shutil.copy(clip_files["c"], folder / "@eaDir" / "thumb.mp4")  # a NAS's thumbnail folder
    shutil.copy(clip_files["c"], folder / "clips" / "._b.mp4")  # a macOS resource fork
    (folder / photos(1, 60)[0].name).unlink()

    assert main(["index", "--sync", str(folder), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    for line in ("video   c.mp4", "video   trips/a-moved.mp4", "video   clips/b.mp4", "remove  clips/a.mp4"):
        assert line in text, text
    assert "thumb.mp4" not in text and "._b.mp4" not in text

    plan = sync_folder(out, folder, progress=False)
    assert sorted(i for i, _ in plan.add_videos) == [
        "c.mp4",
        "clips/b.mp4",
        "trips/a-copy.mp4",
        "trips/a-moved.mp4",
    ]
    assert describe(out)["layout"] == "segments" and describe(out)["deleted"] > 0
    fresh = tmp_path / "fresh"
    build_index(fresh, folder, progress=False)
    assert_same_images(live_state(out), live_state(fresh))
    assert _videos(out) == _videos(fresh)
    assert not sync_folder(out, folder, progress=False)  # nothing left to do

    # the engine sees the synced videos; the same answers as the fresh build
    got, want = vlsearch.load(out), vlsearch.load(fresh)
    for query in ("a dog runs", "people on a street"):
        g, w = got.search_videos(query, k=10).hits, want.search_videos(query, k=10).hits
        assert [(h.id, h.t_start, h.t_end) for h in g] == [(h.id, h.t_start, h.t_end) for h in w]
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=2e-3)
    assert {h.id for h in got.search("a dog", k=20).hits} == {h.id for h in want.search("a dog", k=20).hits}

    # remove a video by id (a moment's own id names nothing: moments go with their video)
    moment = _videos(out)["c.mp4"][2][0]
    assert main(["index", "--remove", moment, "--out", str(out)]) != 0
    capsys.readouterr()
    assert "c.mp4" in _videos(out)
    engine = vlsearch.load(out)
    assert engine.remove(["c.mp4"]) == ["c.mp4"]
    assert "c.mp4" not in _videos(out)
    assert "c.mp4" not in {h.id for h in engine.search_videos("a dog", k=10).hits}
    assert all(h.id != "c.mp4" for h in engine.search_moments("a dog", k=50).hits)
    before = [(h.id, h.t_start, round(h.score, 3)) for h in engine.search_videos("a dog", k=10).hits]

    # compaction keeps every live video whole, with the same answers
    assert main(["index", "--compact", "--out", str(out)]) == 0
    assert describe(out)["segments"] == 1 and describe(out)["deleted"] == 0
    assert set(_videos(out)) == {"clips/b.mp4", "trips/a-copy.mp4", "trips/a-moved.mp4"}
    engine = vlsearch.load(out)
    assert [(h.id, h.t_start, round(h.score, 3)) for h in engine.search_videos("a dog", k=10).hits] == before

    # adding a video to the segmented index is one new segment
    shutil.copy(clip_files["c"], folder / "again.mp4")
    assert main(["index", "--add", str(folder / "again.mp4"), "--out", str(out), "--quiet"]) == 0
    assert describe(out)["segments"] == 2 and "again.mp4" in _videos(out)


def test_deleted_images_lose_their_captions(mini_flickr, tmp_path):
    """A dataset index: image-to-text stops finding a deleted image's captions before any compaction."""
    import vlsearch
    from vlsearch.index.build import build_index

    out, _ = build_index(tmp_path / "dev", mini_flickr, "dev", progress=False)
    engine = vlsearch.load(out)
    records = engine.index.records(range(40))
    # an image that finds one of its own captions (the test's tiny model is weak: not all do)
    row = next(
        r
        for r, rec in enumerate(records)
        if any(h.image_row == r for h in engine.captions_for_image(rec.path, k=10).hits)
    )
    first = records[row]
    assert engine.remove([first.id]) == [first.id]
    hits = engine.captions_for_image(first.path, k=50).hits
    assert len(hits) == 50 and all(h.image_row != row for h in hits)
    assert len(engine.index.captions) == engine.index.n_caption_rows - 5  # its 5 captions are gone

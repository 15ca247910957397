"""`vlsearch index --sync`: after adding, editing, deleting, renaming and duplicating real photo files,
a sync gives exactly the index a fresh build of the folder gives (ids, paths, keys, embeddings)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from tests.conftest import assert_same_images
from vlsearch.cli import main

pytestmark = pytest.mark.usefixtures("tiny_fast_checkpoint")


def _photos(mini_flickr, n):
    return sorted((mini_flickr / "Flicker8k_Dataset").iterdir())[:n]


def test_sync_equals_a_fresh_build(mini_flickr, tmp_path, capsys):
    from vlsearch.index.build import build_index
    from vlsearch.index.sync import sync_folder
    from vlsearch.index.update import live_state

    photos = _photos(mini_flickr, 30)
    folder = tmp_path / "Pictures"
    (folder / "2019").mkdir(parents=True)
    for p in photos[:20]:
        shutil.copy(p, folder / "2019" / p.name)
    out = tmp_path / "idx"
    # no index yet: --sync builds it
    assert main(["index", "--sync", str(folder), "--out", str(out), "--quiet"]) == 0
    assert "20 to add" in capsys.readouterr().out
    assert len(live_state(out)) == 20

    # a day of changes
    for p in photos[20:25]:  # new
        shutil.copy(p, folder / p.name)
    edited = folder / "2019" / photos[0].name  # edited in place: other pixels, same path
    Image.open(edited).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited, quality=90)
    (folder / "2019" / photos[1].name).unlink()  # deleted
    (folder / "trips").mkdir()
    (folder / "2019" / photos[2].name).rename(folder / "trips" / "beach.jpg")  # moved and renamed
    shutil.copy(folder / "2019" / photos[3].name, folder / "trips" / "copy.jpg")  # a duplicate
    shutil.copy(photos[20], folder / "trips" / "again.jpg")  # a new file, twice

    before = live_state(out)
    assert main(["index", "--sync", str(folder), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "add     trips/again.jpg" in text  # new content, twice: both planned, embedded once
    assert f"change  2019/{photos[0].name}" in text and f"remove  2019/{photos[1].name}" in text
    assert "move    trips/beach.jpg" in text and "move    trips/copy.jpg" in text
    assert "dry run: nothing changed" in text
    assert live_state(out) == before

    plan = sync_folder(out, folder, progress=False)
    assert (len(plan.add), len(plan.change), len(plan.move), plan.unchanged) == (6, 1, 2, 17)
    assert sorted(plan.remove) == sorted(f"2019/{photos[i].name}" for i in (0, 1, 2))
    fresh = tmp_path / "fresh"
    build_index(fresh, folder, progress=False)
    got, want = live_state(out), live_state(fresh)
    assert_same_images(got, want)  # same paths, content keys and (to batch rounding) embeddings
    assert got["trips/beach.jpg"][2] == before[f"2019/{photos[2].name}"][2]  # the moved one kept it
    assert got["trips/again.jpg"][1] == got[photos[20].name][1]

    # synced twice: nothing to do; the search sees the folder as it is
    assert not sync_folder(out, folder, progress=False)
    import vlsearch

    engine = vlsearch.load(out)
    ids = {h.id for h in engine.search("a dog", k=100).hits}
    assert ids == set(want)
    hits = engine.search("a dog", k=100, folder="trips").hits
    assert {h.id for h in hits} == {"trips/beach.jpg", "trips/copy.jpg", "trips/again.jpg"}
    # compacted, it is still the fresh build's index
    assert main(["index", "--compact", "--out", str(out)]) == 0
    assert_same_images(live_state(out), want)

"""The segmented index: adds as new segments, deletes as tombstones, compaction, older layouts, and two
writers with a reader at once (real Flickr8k photos, the tiny trained Fast model)."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from vlsearch.cli import main

pytestmark = pytest.mark.usefixtures("tiny_fast_checkpoint")


def _train(mini_flickr, n, start=0):
    names = sorted((mini_flickr / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split())
    return [mini_flickr / "Flicker8k_Dataset" / x for x in names[start : start + n]]


def _folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def plain(mini_flickr, tmp_path):
    from vlsearch.index.build import build_index

    out = tmp_path / "idx"
    build_index(out, mini_flickr, "dev", progress=False)
    return out


def test_add_is_a_new_segment_delete_a_tombstone_compact_merges(plain, mini_flickr, tmp_path, capsys):
    import vlsearch
    from vlsearch.index.gallery import GalleryIndex, read_captions
    from vlsearch.index.manifest import read_manifest_meta

    engine = vlsearch.load(plain)
    before = {h.id for h in engine.search("a dog", k=40).hits}
    captions_before = read_captions(GalleryIndex.open(plain))
    new = _train(mini_flickr, 6)
    assert engine.add(_folder(tmp_path, "new", new)) == 6
    meta = read_manifest_meta(plain)
    assert meta["layout"] == "segments" and len(meta["segments"]) == 2
    # the plain index's files became the first segment (hard links): nothing is left at the top
    assert sorted(p.name for p in plain.iterdir()) == sorted(["config.json", *meta["segments"]])
    idx = engine.index
    assert len(idx.images) == 46 and idx.config.n_images == 46
    assert engine.search_image(new[2], k=1).hits[0].id == new[2].name
    assert read_captions(idx) == captions_before  # dataset captions kept, rows unchanged
    # delete: gone from every kind of search at once, and by id
    victim = engine.search("a dog", k=1).hits[0]
    assert engine.remove([victim.id, "no-such-id"]) == [victim.id]
    assert len(engine.index.images) == 45
    assert victim.id not in {h.id for h in engine.search("a dog", k=45).hits}
    assert len(engine.search("a dog", k=100).hits) == 45
    assert engine.index.row_of_id(victim.id) is None
    assert victim.id not in {h.id for h in engine.search("a dog", k=45, after="1970-01-01").hits}
    assert engine.search_image(victim.path, k=1).hits[0].id != victim.id
    assert main(["index", "--remove", new[0].name, "--out", str(plain)]) == 0
    assert "removed 1" in capsys.readouterr().out
    engine.refresh()
    assert len(engine.index.images) == 44
    # compact: one segment, the deleted rows gone for good, the same results
    want = [(h.id, round(h.score, 4)) for h in engine.search("two people on a beach", k=10).hits]
    assert main(["index", "--compact", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "2 segment(s) -> 1" in out and "2 deleted row(s) dropped" in out
    engine.refresh()
    idx = engine.index
    assert len(idx.shards) == 1 and idx.n_rows == 44 and len(idx.dead) == 0
    got = [(h.id, round(h.score, 4)) for h in engine.search("two people on a beach", k=10).hits]
    assert [i for i, _ in got] == [i for i, _ in want]  # scores: to faiss's summation order (1e-4 seen)
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=2e-4)
    kept = {r.id for r in idx.all_records()}
    assert kept == (before | {f.name for f in new}) - {victim.id, new[0].name}
    # captions of the remaining images keep pointing at their images
    caps = read_captions(idx)
    assert len(caps) == len(captions_before) - (5 if victim.id in before else 0)
    assert all(0 <= i < 44 for _, i in caps)


def test_old_layouts_open_and_convert(plain, mini_flickr, tmp_path):
    import vlsearch
    from vlsearch.index.manifest import read_manifest_meta
    from vlsearch.index.update import live_state

    state = live_state(plain)
    # the sharded layout `index --ray` wrote before segments: same folders, "layout": "sharded"
    old = tmp_path / "sharded"
    old.mkdir()
    shutil.copytree(plain, old / "shard-00000")
    meta = read_manifest_meta(plain)
    (old / "config.json").write_text(
        json.dumps(
            {
                **{k: meta[k] for k in ("vlsearch_version", "format_version")},
                "layout": "sharded",
                "shards": ["shard-00000"],
                "config": {**meta["config"], "kind": "sharded"},
            }
        )
    )
    assert live_state(old) == state
    engine = vlsearch.load(old)
    hit = engine.search("a dog", k=1).hits[0]
    assert engine.remove(hit.id) == [hit.id]  # the first write converts it in place
    assert read_manifest_meta(old)["layout"] == "segments"
    assert len(engine.index.images) == 39
    # a manifest naming a missing segment is a clear error, not a crash
    meta = read_manifest_meta(old)
    shutil.rmtree(old / meta["segments"][0])
    from vlsearch.errors import IndexError_

    with pytest.raises(IndexError_, match="missing"):
        vlsearch.load(old)


def test_two_writers_and_a_reader(plain, mini_flickr, tmp_path):
    """Adds and deletes from two threads while a third searches: no write lost, every search sees a
    whole state (the live count is always one a sequence of the writes gives)."""
    from vlsearch.index.build import add_to_index
    from vlsearch.index.gallery import GalleryIndex
    from vlsearch.index.update import remove_ids

    files = _train(mini_flickr, 12)
    batches = [_folder(tmp_path, f"b{i}", files[i * 3 : i * 3 + 3]) for i in range(4)]
    shutil.copytree(plain, tmp_path / "warm")
    for b in batches:  # features cached first: the race, not the backbone, is what runs below
        add_to_index(tmp_path / "warm", b, progress=False)
    start = {r.id for r in GalleryIndex.open(plain).all_records()}
    victims = sorted(start)[:6]
    errors, seen = [], set()
    stop = threading.Event()

    def writer_a():
        for b in batches[:2]:
            add_to_index(plain, b, progress=False)
        remove_ids(plain, victims[:3])

    def writer_b():
        remove_ids(plain, victims[3:])
        for b in batches[2:]:
            add_to_index(plain, b, progress=False)

    def reader():
        while not stop.is_set():
            try:
                idx = GalleryIndex.open(plain)
                n = len(idx.images)
                assert n == len(idx.all_records()) == idx.config.n_images
                seen.add(n)
                idx.close()
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=f) for f in (writer_a, writer_b)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert not errors
    final = {x.id for x in GalleryIndex.open(plain).all_records()}
    assert final == (start - set(victims)) | {f.name for f in files}
    # every count a reader saw is 40 + 3a - b for some a adds and b deletes done
    assert seen <= {40 + 3 * a - b for a in range(5) for b in range(7)}


def test_rebuild_over_a_segmented_index(plain, mini_flickr, tmp_path):
    from vlsearch.index.build import build_index
    from vlsearch.index.gallery import GalleryIndex
    from vlsearch.index.update import live_state, remove_ids

    remove_ids(plain, [GalleryIndex.open(plain).record(0).id])
    build_index(plain, mini_flickr, "dev", progress=False)  # a rebuild swaps the whole folder
    assert len(GalleryIndex.open(plain).images) == 40
    assert len(live_state(plain)) == 40


def test_delete_route_and_compaction_under_a_running_service(plain, mini_flickr, tmp_path):
    """DELETE /images/{id} needs the write token; the removed image leaves results at once; the service
    keeps answering while another process compacts, and picks up the compacted index."""
    from tests.test_serve import start_server

    s = start_server(plain, write_token="s3cret-token")
    try:
        with s.client() as c:
            top = c.get("/search", params={"q": "a dog", "k": 3}).json()["results"]
            victim = top[0]["id"]
            assert c.delete(f"/images/{victim}").status_code == 401
            auth = {"Authorization": "Bearer s3cret-token"}
            assert c.delete("/images/no-such.jpg", headers=auth).status_code == 404
            r = c.delete(f"/images/{victim}", headers=auth)
            assert r.status_code == 200 and r.json() == {"removed": [victim], "n_images": 39}
            after = c.get("/search", params={"q": "a dog", "k": 40}).json()["results"]
            assert victim not in {h["id"] for h in after} and len(after) == 39
            assert c.get(f"/images/{victim}").status_code == 404  # the page hides a card whose image 404s
            assert c.get("/healthz").json()["index"]["n_images"] == 39
            want = [h["id"] for h in after[:10]]
            # an add lands as a segment, then another process compacts while searches go on
            new = _folder(tmp_path, "new", _train(mini_flickr, 4))
            assert main(["index", "--add", str(new), "--out", str(plain), "--quiet"]) == 0
            done = threading.Event()
            answers = []

            def search_loop():
                while not done.is_set():
                    answers.append(c.get("/search", params={"q": "a dog", "k": 5}).status_code)

            t = threading.Thread(target=search_loop)
            t.start()
            assert main(["index", "--compact", str(plain)]) == 0
            done.set()
            t.join()
            assert answers and set(answers) == {200}
            h = c.get("/healthz").json()["index"]
            assert h["n_images"] == 43
            ids = [x["id"] for x in c.get("/search", params={"q": "a dog", "k": 43}).json()["results"]]
            assert victim not in ids and [i for i in ids if i in want] == want
    finally:
        s.stop()

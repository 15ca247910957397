"""The Fast path end to end on real photos: cache, checkpoint, index, search, eval, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import link_photo
from vlsearch.cli import main
from vlsearch.errors import CheckpointError, IndexError_, QueryError
from vlsearch.precision import autocast, compute_dtype


def test_feature_cache_reused(mini_flickr, monkeypatch):
    from vlsearch.data import load_flickr8k
    from vlsearch.encoders.features import FeatureExtractor

    ds = load_flickr8k(mini_flickr, "dev")
    fx = FeatureExtractor(progress=False)
    first = fx.image_keys(ds.image_paths[:8])
    assert all(first.keys)
    grid = fx.images.get_stacked(first.keys, "grid")
    assert grid.shape == (8, 49, 1280) and grid.dtype == np.float16
    assert fx.images.get_stacked(first.keys, "mid").shape == (8, 196, 112)
    # a second extractor must not compute anything: its backbone would fail if built
    fx2 = FeatureExtractor(progress=False)
    monkeypatch.setattr(
        type(fx2), "image_backbone", property(lambda self: pytest.fail("recomputed features"))
    )
    assert fx2.image_keys(ds.image_paths[:8]).keys == first.keys


def test_corrupt_images_are_skipped_and_reported(tmp_path, mini_flickr):
    from vlsearch.data import load_folder
    from vlsearch.encoders.features import FeatureExtractor

    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted((mini_flickr / "Flicker8k_Dataset").iterdir())[:3]
    for p in good:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    ds = load_folder(folder)
    feats = FeatureExtractor(progress=False).image_keys(ds.image_paths)
    bad = {p.split("/")[-1] for p, _ in feats.report.skipped}
    assert bad == {"broken.jpg", "truncated.jpg", "empty.png"}
    assert sum(k is not None for k in feats.keys) == 3


def test_checkpoint_round_trip_and_version_mismatch(tiny_fast_checkpoint, tmp_path):
    import torch

    from vlsearch.models.checkpoint import load_checkpoint
    from vlsearch.models.fast import FastModel
    from vlsearch.models.registry import load_model

    model, meta, path = load_model("fast")
    assert meta["model_type"] == "fast" and meta["vlsearch_version"]
    states = torch.randn(2, 7, 384)
    lengths = torch.tensor([7, 4])
    again, _ = load_checkpoint(path, FastModel)
    assert torch.allclose(model.encode_text(states, lengths), again.encode_text(states, lengths))
    # another format version
    bad = tmp_path / "old"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["format_version"] = 0
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format version"):
        load_model(bad)
    # a config this version does not know
    cfg["format_version"] = json.loads((path / "config.json").read_text())["format_version"]
    cfg["config"]["attention_pool"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(bad)
    # corrupt weights
    shutil.copy(path / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="neither a named model"):
        load_model(tmp_path / "missing")


def test_index_round_trip_search_and_add(tiny_fast_checkpoint, mini_flickr, tmp_path, capsys):
    import vlsearch
    from vlsearch.index.build import build_index
    from vlsearch.index.gallery import GalleryIndex

    out = tmp_path / "idx"
    build_index(out, mini_flickr, "dev", progress=False)
    idx = GalleryIndex.open(out)
    assert idx.config.n_images == 40 and idx.config.n_captions == 200 and idx.config.kind == "flat"
    engine = vlsearch.load(out)
    res = engine.search("a dog runs through the grass", k=5)
    assert len(res.hits) == 5 and len({h.row for h in res.hits}) == 5
    assert res.hits[0].score >= res.hits[-1].score
    # an image finds itself first
    first = idx.record(0)
    assert engine.search_image(first.path, k=3).hits[0].row == 0
    assert len(engine.captions_for_image(first.path, k=4).hits) == 4
    # adding a folder of new images (the train photos) without a rebuild
    folder = tmp_path / "new"
    folder.mkdir()
    train = sorted((mini_flickr / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split())[:5]
    for name in train:
        shutil.copy(mini_flickr / "Flicker8k_Dataset" / name, folder / name)
    assert engine.add(folder) == 5
    assert len(engine.index.images) == 45
    assert engine.search_image(folder / train[0], k=1).hits[0].id == train[0]
    assert engine.add(folder) == 0  # already there
    # the CLI reads the same index
    assert main(["search", "a dog", "--index", str(out), "--k", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["results"]) == 3


def test_concurrent_adds_lose_nothing(tiny_fast_checkpoint, mini_flickr, tmp_path, monkeypatch):
    """Two adds racing on one index (`index --add` against the service's POST /images): the second
    reads the index only after the first has swapped its images in, so both sets land."""
    import threading

    from vlsearch.index import build
    from vlsearch.index.gallery import GalleryIndex

    out = tmp_path / "idx"
    build.build_index(out, mini_flickr, "dev", progress=False)
    train = sorted((mini_flickr / "Flickr8k_text" / "Flickr_8k.trainImages.txt").read_text().split())
    folders = []
    for n, names in enumerate((train[:3], train[3:6])):
        folder = tmp_path / f"new{n}"
        folder.mkdir()
        for name in names:
            link_photo(mini_flickr / "Flicker8k_Dataset" / name, folder / name)
        folders.append(folder)
    build.add_to_index(out, folders[0], progress=False)  # warm the caches: only the race below is timed
    shutil.rmtree(out)
    build.build_index(out, mini_flickr, "dev", progress=False)

    first_writing = threading.Event()
    real_write = build.write_gallery

    def slow_write(*args, **kwargs):  # the first writer sits between its read and its swap
        if threading.current_thread().name == "first":
            first_writing.set()
            threading.Event().wait(1.5)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(build, "write_gallery", slow_write)
    added = {}

    def add(n):
        added[n] = build.add_to_index(out, folders[n], progress=False)[0]

    first = threading.Thread(target=add, args=(0,), name="first")
    first.start()
    assert first_writing.wait(60)
    add(1)
    first.join()
    assert added == {0: 3, 1: 3}
    index = GalleryIndex.open(out)
    assert len(index.images) == 46 and {r.id for r in build.read_records(index)} >= set(train[:6])


def test_bad_queries_and_corrupt_index(tiny_fast_checkpoint, mini_flickr, tmp_path, capsys):
    import vlsearch
    from vlsearch.index.build import build_index

    out = tmp_path / "idx"
    build_index(out, mini_flickr, "dev", progress=False)
    engine = vlsearch.load(out)
    for bad in ["", "   ", "x" * 10_000, b"\xff\xfe\x00", "a\x00b"]:
        with pytest.raises(QueryError):
            engine.search(bad, 5)
    for k in [0, -1, 10**9, "ten"]:
        with pytest.raises(QueryError):
            engine.search("a dog", k)
    with pytest.raises(QueryError):
        engine.search_image(b"not an image", 3)
    (out / "images.faiss").write_bytes(b"corrupt")
    with pytest.raises(IndexError_, match="corrupt"):
        vlsearch.load(out)
    assert main(["search", "a dog", "--index", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["search", "a dog", "--index", str(tmp_path / "none")]) == 2


def test_eval_json_and_images_subset(tiny_fast_checkpoint, mini_flickr, capsys):
    assert main(["eval", "--data-root", str(mini_flickr), "--split", "dev", "--images", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 10 and out["n_captions"] == 50 and out["model"] == "fast"
    for direction in ("t2i", "i2t"):
        assert set(out[direction]) == {"r1", "r5", "r10"}
        assert 0 <= out[direction]["r1"] <= out[direction]["r5"] <= out[direction]["r10"] <= 100
    assert abs(out["rsum"] - sum(out["t2i"].values()) - sum(out["i2t"].values())) < 1e-6
    # the same numbers, computed here from the model's own embeddings of the same 10 images
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.eval.metrics import retrieval_metrics
    from vlsearch.models.embed import embed_features
    from vlsearch.models.fast import set_concepts
    from vlsearch.models.registry import load_model

    net = load_model("fast")[0]
    set_concepts(net, True)
    feats = DatasetFeatures.load(load_dataset(mini_flickr, "dev").sample(10, 0), progress=False)
    img, txt = embed_features(net, feats)
    want = retrieval_metrics(txt @ img.T, feats.caption_image.numpy())
    for direction in ("t2i", "i2t"):
        for k in ("r1", "r5"):
            assert out[direction][k] == pytest.approx(want[direction][k], abs=1e-6), (direction, k)
    assert main(["eval", "--data-root", str(mini_flickr), "--split", "test"]) == 2


def test_inference_copies_keep_autocast_numbers_and_the_model(tiny_fast_checkpoint):
    """The search path's bf16-weight copies give autocast's embeddings bit for bit, and leave the model
    they copy (trained and saved elsewhere) in fp32."""
    import torch

    from vlsearch.encoders.text import TextBackbone, load_minilm
    from vlsearch.models.registry import load_model
    from vlsearch.search.embedder import Embedder

    net = load_model(str(tiny_fast_checkpoint))[0].eval()
    embedder = Embedder(net, progress=False)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(p.dtype == compute_dtype() for p in embedder.model.parameters())
    gen = torch.Generator().manual_seed(0)
    states, lengths = torch.randn(5, 9, 384, generator=gen), torch.tensor([9, 3, 5, 1, 7])
    grid = torch.randn(3, 49, net.config.image_dim, generator=gen)
    with torch.no_grad(), autocast():
        want_text = net.encode_text(states, lengths).float().numpy()
        want_image = net.encode_image(grid, None).float().numpy()
    np.testing.assert_array_equal(embedder._text(states.numpy(), lengths.numpy()), want_text)
    np.testing.assert_array_equal(embedder._image(grid.numpy()), want_image)

    backbone = TextBackbone()
    bert, _ = load_minilm()
    assert all(p.dtype == torch.float32 for p in bert.parameters())  # it also initialises new models
    batch = backbone.tokenize(["a dog runs through the snow", "two girls"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad(), autocast():
        h = bert.embeddings(input_ids=ids)
        ext = (1.0 - mask[:, None, None, :].to(h.dtype)) * -10000.0
        for layer in bert.encoder.layer[: backbone.config.split_layer]:
            out = layer(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(backbone(ids, mask), h.float(), rtol=0, atol=0)

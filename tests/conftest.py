"""Shared fixtures. Tests that need the real data read ../shared/data and skip cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlsearch.settings import set_offline

set_offline()
os.environ.setdefault("VLSEARCH_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VLSEARCH_DATA", REPO.parent / "shared" / "data")).resolve()
FLICKR = DATA / "flickr8k"
COCO = DATA / "coco-mini"


def assert_same_images(got: dict, want: dict, atol: float = 1e-3) -> None:
    """Two indexes' live images (``index.update.live_state``) are the same: ids, paths and content keys
    exactly; fp16 embeddings within ``atol``. The embedding is computed in batches, and a CPU's GEMM
    kernels may round a row differently in a batch of 6 than of 25 (seen on an AMD AVX2 machine: one
    fp16 ulp), which says nothing about the index."""
    import numpy as np

    assert sorted(got) == sorted(want)
    for image_id, (path, key, emb) in want.items():
        assert got[image_id][:2] == (path, key), image_id
        a = np.frombuffer(got[image_id][2], np.float16).astype(np.float32)
        b = np.frombuffer(emb, np.float16).astype(np.float32)
        assert a.shape == b.shape and np.abs(a - b).max() <= atol, (image_id, np.abs(a - b).max())


def need_data():
    if not (FLICKR / "Flickr8k_text").is_dir():
        pytest.skip(f"needs the Flickr8k data at {FLICKR}")


# Caches keyed by content (backbone features, mined negatives, teacher scores): shared by every test's home.
SHARED_CACHES = ("features", "mining", "distill", "runtime")
# Named models a fixture provides, by fixture name: a test's own home holds exactly the ones it asks for.
NAMED_FIXTURES = {"tiny_fast_checkpoint": "fast", "slow_checkpoint": "slow", "tiny_slow_checkpoint": "slow"}


def link_photo(src, dst) -> None:
    """A real file at ``dst`` with ``src``'s bytes: a hard link where the filesystem allows, else a copy.
    Not a symlink: folders skip symlinks that leave them (issue 13), as a user's index would."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """The home session- and module-scoped fixtures build in (named models, indexes). Each test then gets
    its own home (``_home``) that shares only the content-keyed caches and the models it asks for."""
    home = tmp_path_factory.mktemp("vlsearch-home")
    for name in SHARED_CACHES:
        (home / name).mkdir()
    os.environ["VLSEARCH_HOME"] = str(home)
    os.environ["VLSEARCH_DATA"] = str(DATA)
    return home


@pytest.fixture(autouse=True)
def _home(session_home, request, tmp_path_factory, monkeypatch):
    """A fresh VLSEARCH_HOME per test: its writes (models, indexes) stay its own, and what it finds there
    does not depend on which tests ran before it."""
    home = tmp_path_factory.mktemp("home")
    for name in SHARED_CACHES:
        (home / name).symlink_to(session_home / name)
    (home / "models").mkdir()
    linked: dict[str, Path] = {}
    for fixture, name in NAMED_FIXTURES.items():
        if fixture in request.fixturenames:
            path = Path(request.getfixturevalue(fixture))
            if name in linked and linked[name] != path:
                pytest.fail(f"a test asks for two different {name!r} models ({linked[name]}, {path})")
            linked[name] = path
    for name, path in linked.items():
        (home / "models" / name).symlink_to(path)
    monkeypatch.setenv("VLSEARCH_HOME", str(home))
    monkeypatch.setenv("VLSEARCH_DATA", str(DATA))
    return home


@pytest.fixture(scope="session")
def mini_flickr(tmp_path_factory):
    """A real Flickr8k-layout folder with 60 train and 40 dev photos (hard links or copies), and no test split file."""
    need_data()
    root = tmp_path_factory.mktemp("mini-flickr") / "flickr8k"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flickr8k_text").mkdir()
    text = FLICKR / "Flickr8k_text"
    train = (text / "Flickr_8k.trainImages.txt").read_text().split()[:60]
    dev = (text / "Flickr_8k.devImages.txt").read_text().split()[:40]
    for name in train + dev:
        link_photo(FLICKR / "Flicker8k_Dataset" / name, root / "Flicker8k_Dataset" / name)
    keep = set(train + dev)
    lines = [ln for ln in (text / "Flickr8k.token.txt").read_text().splitlines() if ln.split("#")[0] in keep]
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").write_text("\n".join(dev) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_fast_checkpoint(mini_flickr, session_home):
    """A real Fast model trained for a few epochs on the mini split, saved as the named model `fast`."""
    from vlsearch.training.common import TrainRequest
    from vlsearch.training.fast import train_and_save

    out = session_home / "models" / "fast"
    req = TrainRequest(data_root=str(mini_flickr), epochs=3, out=str(out), quiet=True)
    return train_and_save(req, extra={"batch_size": 32, "warmup_steps": 2})


@pytest.fixture(scope="session")
def slow_checkpoint(tiny_fast_checkpoint, session_home):
    """The named model `slow` for the real re-ranking path (vlsearch.search.rerank.Reranker): always a
    real, untrained SlowModel (seeded; fusion layers from MiniLM, cross-attention fresh), whatever ran
    before. Training one and choosing its fusion weight takes minutes on 2 cores and is test_slow.py's
    job (its ``tiny_slow_checkpoint``); the service only needs scores and attention maps, not their
    quality. Fusion weight 1 so re-ranking visibly reorders."""
    import torch

    from vlsearch.models.checkpoint import save_checkpoint
    from vlsearch.models.slow import SlowConfig, SlowModel

    torch.manual_seed(0)
    model = SlowModel(SlowConfig(fusion_weight=1.0, fusion_weight_i2t=1.0))
    return save_checkpoint(
        session_home / "models" / "slow", model, {"note": "untrained, for the service tests"}
    )

"""Shared fixtures. Tests that need the real data read ../shared/data and skip cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLSEARCH_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VLSEARCH_DATA", REPO.parent / "shared" / "data")).resolve()
FLICKR = DATA / "flickr8k"
COCO = DATA / "coco-mini"


def need_data():
    if not (FLICKR / "Flickr8k_text").is_dir():
        pytest.skip(f"needs the Flickr8k data at {FLICKR}")


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    """One VLSEARCH_HOME for the whole session, so features computed by one test are reused by the next."""
    home = tmp_path_factory.mktemp("vlsearch-home")
    return home


@pytest.fixture(autouse=True)
def _home(session_home, monkeypatch):
    monkeypatch.setenv("VLSEARCH_HOME", str(session_home))
    monkeypatch.setenv("VLSEARCH_DATA", str(DATA))


@pytest.fixture(scope="session")
def mini_flickr(tmp_path_factory):
    """A real Flickr8k-layout folder with 60 train and 40 dev photos (symlinked), and no test split file."""
    need_data()
    root = tmp_path_factory.mktemp("mini-flickr") / "flickr8k"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    (root / "Flickr8k_text").mkdir()
    text = FLICKR / "Flickr8k_text"
    train = (text / "Flickr_8k.trainImages.txt").read_text().split()[:60]
    dev = (text / "Flickr_8k.devImages.txt").read_text().split()[:40]
    for name in train + dev:
        (root / "Flicker8k_Dataset" / name).symlink_to(FLICKR / "Flicker8k_Dataset" / name)
    keep = set(train + dev)
    lines = [ln for ln in (text / "Flickr8k.token.txt").read_text().splitlines() if ln.split("#")[0] in keep]
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (root / "Flickr8k_text" / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").write_text("\n".join(dev) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_fast_checkpoint(mini_flickr, session_home):
    """A real Fast model trained for a few epochs on the mini split, saved as the named model `fast`."""
    import argparse

    os.environ["VLSEARCH_HOME"] = str(session_home)
    from vlsearch.training import fast as fast_training

    args = argparse.Namespace(data_root=str(mini_flickr), epochs=3, seed=0, out=None, quiet=True)
    return fast_training.train_from_args(args, extra={"batch_size": 32, "warmup_steps": 2})


@pytest.fixture(scope="session")
def slow_checkpoint(tiny_fast_checkpoint, session_home):
    """The named model `slow` for the real re-ranking path (vlsearch.search.rerank.Reranker).

    A trained one is reused when tests/test_slow.py made it already; otherwise this saves, in a second,
    a real SlowModel whose fusion layers start from MiniLM and whose cross-attention is fresh (training
    and choosing its fusion weight on dev takes minutes on 2 cores and is test_slow.py's job). The
    service only needs its scores and attention maps, not their quality; fusion weight 1 so re-ranking
    visibly reorders."""
    import torch

    from vlsearch.models.checkpoint import save_checkpoint
    from vlsearch.models.registry import default_checkpoint
    from vlsearch.models.slow import SlowConfig, SlowModel

    os.environ["VLSEARCH_HOME"] = str(session_home)
    ckpt = default_checkpoint("slow")
    if not (ckpt / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = SlowModel(SlowConfig(fusion_weight=1.0, fusion_weight_i2t=1.0))
        save_checkpoint(ckpt, model, {"note": "untrained, for the service tests"})
    return ckpt

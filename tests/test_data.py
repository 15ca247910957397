"""Loaders on real files: Flickr8k, COCO-mini, a Karpathy JSON, and plain folders with corrupt images."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import COCO, FLICKR, need_data
from vlsearch.data import load_coco, load_dataset, load_flickr8k, load_folder, load_karpathy
from vlsearch.errors import DataError


def test_flickr8k_dev_split():
    need_data()
    ds = load_flickr8k(FLICKR.parent, "dev")
    assert ds.n_images == 1000
    assert len(ds.captions) == 5000
    assert all(p.is_file() for p in ds.image_paths[:20])
    # every image has exactly five captions
    assert sorted({len(c) for c in ds.image_captions()}) == [5]
    assert load_flickr8k(FLICKR, "val").n_images == 1000  # alias, and the flickr8k folder itself as root


def test_flickr8k_missing_split_is_clear(mini_flickr):
    with pytest.raises(DataError, match="testImages"):
        load_flickr8k(mini_flickr, "test")


def test_flickr8k_test_only_layout(tmp_path, mini_flickr):
    """A folder that holds only a test split (the held-out layout) loads as split `test`."""
    root = tmp_path / "f8k"
    shutil.copytree(mini_flickr, root, symlinks=True)
    text = root / "Flickr8k_text"
    (text / "Flickr_8k.devImages.txt").rename(text / "Flickr_8k.testImages.txt")
    (text / "Flickr_8k.trainImages.txt").unlink()
    ds = load_dataset(root, "test")
    assert ds.split == "test" and ds.n_images == 40 and len(ds.captions) == 200


def test_coco_mini():
    need_data()
    ds = load_coco(COCO)
    assert ds.n_images == 80 and len(ds.captions) == 400
    assert load_dataset(COCO, "dev").name == "coco"


def test_karpathy_json(tmp_path, mini_flickr):
    names = sorted(p.name for p in (mini_flickr / "Flicker8k_Dataset").iterdir())[:6]
    data = {
        "dataset": "flickr8k",
        "images": [
            {
                "filename": n,
                "split": ["train", "val", "test"][i % 3],
                "sentences": [{"raw": f"caption {i} {j}", "tokens": []} for j in range(5)],
            }
            for i, n in enumerate(names)
        ],
    }
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    ds = load_karpathy(path, mini_flickr / "Flicker8k_Dataset", "dev")
    assert ds.n_images == 2 and len(ds.captions) == 10
    assert ds.captions[0] == "caption 1 0"
    assert load_karpathy(path, mini_flickr / "Flicker8k_Dataset", "train").n_images == 2


def test_folder_and_subset(tmp_path, mini_flickr):
    ds = load_folder(mini_flickr / "Flicker8k_Dataset")
    assert ds.n_images == 100 and not ds.captions
    dev = load_flickr8k(mini_flickr, "dev")
    sub = dev.sample(10, seed=3)
    assert sub.n_images == 10 and len(sub.captions) == 50
    assert sub.image_ids == dev.sample(10, seed=3).image_ids  # seeded
    with pytest.raises(DataError):
        load_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")

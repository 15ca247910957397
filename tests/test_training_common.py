"""training/common.py: the one schedule, flip, caption lists and dev loading the trainers share."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from vlsearch.errors import DataError, MissingSplitError
from vlsearch.training.common import (
    TrainRequest,
    captions_of_images,
    hflip,
    load_dev,
    map_side,
    warmup_cosine,
)


def test_warmup_then_cosine_to_zero():
    assert [warmup_cosine(s, 4, 0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 0, 10) == 1.0
    assert warmup_cosine(9, 4, 5, 10) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(30, 4, 1.7) == pytest.approx(0.0, abs=1e-12)  # a time budget overrun stays at 0
    # step-based as the Fast trainer uses it: exactly the formula it always had
    total, warm = 300, 100
    for step in range(warm, total + 1):
        old = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        assert warmup_cosine(step, warm, step - warm, max(1, total - warm)) == old


def test_hflip_mirrors_each_square_map():
    grid = torch.arange(2 * 49 * 3, dtype=torch.float32).reshape(2, 49, 3)
    mid = torch.randn(2, 196, 5)
    assert map_side(grid) == 7 and map_side(mid) == 14
    flipped = hflip(grid)
    assert torch.equal(flipped.view(2, 7, 7, 3)[:, :, 0], grid.view(2, 7, 7, 3)[:, :, 6])
    assert torch.equal(hflip(flipped), grid) and hflip(None) is None
    assert torch.equal(hflip(mid), mid.view(2, 14, 14, 5).flip(2).reshape(2, 196, 5))
    with pytest.raises(ValueError, match="not square"):
        hflip(torch.zeros(1, 50, 2))


def test_captions_of_images():
    assert captions_of_images(torch.tensor([2, 0, 2, 2]), 4) == [[1], [], [0, 2, 3], []]


def test_a_missing_dev_split_is_said_and_skipped_other_errors_raise(mini_flickr, tmp_path, capsys):
    root = tmp_path / "flickr8k"
    shutil.copytree(mini_flickr, root, symlinks=True)
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    assert load_dev(TrainRequest(data_root=str(root))) is None
    assert "no dev split, so no dev evaluation" in capsys.readouterr().err
    with pytest.raises(MissingSplitError):  # what load_dev catches, and only that
        from vlsearch.data import load_dataset

        load_dataset(root, "dev")
    with pytest.raises(DataError, match="does not exist"):
        load_dev(TrainRequest(data_root=str(tmp_path / "nowhere")))
    (root / "Flickr8k_text" / "Flickr8k.token.txt").unlink()
    with pytest.raises(DataError, match="Flickr8k.token.txt"):
        load_dev(TrainRequest(data_root=str(root)))

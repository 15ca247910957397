"""Recall computation against hand-computed cases; ties count against the ground truth."""

import numpy as np
import pytest

from vlsearch.eval.metrics import i2t_ranks, retrieval_metrics, t2i_ranks


def test_hand_computed_recalls():
    # 3 images, 2 captions each: caption c belongs to image c // 2.
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    sim = np.array(
        [
            [0.9, 0.1, 0.2],  # c0 -> img0 rank 0
            [0.1, 0.5, 0.3],  # c1 -> img0 rank 2
            [0.2, 0.8, 0.1],  # c2 -> img1 rank 0
            [0.7, 0.6, 0.1],  # c3 -> img1 rank 1
            [0.3, 0.2, 0.1],  # c4 -> img2 rank 2
            [0.4, 0.9, 0.5],  # c5 -> img2 rank 1
        ]
    )
    assert t2i_ranks(sim, caption_image).tolist() == [0, 2, 0, 1, 2, 1]
    # image columns: img0 [.9,.1,.2,.7,.3,.4]: best right caption c0 (.9), no wrong caption >= .9 -> 0
    # img1 [.1,.5,.8,.6,.2,.9]: best right c2 (.8); wrong c5 (.9) >= .8 -> 1
    # img2 [.2,.3,.1,.1,.1,.5]: best right c5 (.5); no wrong caption >= .5 -> 0
    assert i2t_ranks(sim, caption_image).tolist() == [0, 1, 0]
    m = retrieval_metrics(sim, caption_image)
    assert m["t2i"]["r1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i"]["r5"] == 100.0
    assert m["i2t"]["r1"] == pytest.approx(100 * 2 / 3)
    assert abs(m["rsum"] - (100 * 2 / 6 + 100 + 100 + 100 * 2 / 3 + 100 + 100)) < 1e-9


def test_ties_count_against_the_ground_truth():
    caption_image = np.array([0, 1, 2])
    sim = np.array([[0.5, 0.5, 0.1], [0.2, 0.3, 0.3], [0.0, 0.0, 0.0]])
    # c0 ties with img1, c1 ties with img2, c2 ties with both others
    assert t2i_ranks(sim, caption_image).tolist() == [1, 1, 2]
    # img0 column [.5,.2,0]: no wrong caption >= .5 -> 0; img1 [.5,.3,0]: c0 .5 >= .3 -> 1;
    # img2 [.1,.3,0]: c0 .1 and c1 .3 >= 0 -> 2
    assert i2t_ranks(sim, caption_image).tolist() == [0, 1, 2]


@pytest.mark.parametrize("n_images", [10, 100])
def test_a_constant_scorer_gets_no_better_than_chance(n_images):
    caption_image = np.repeat(np.arange(n_images), 5)
    sim = np.full((len(caption_image), n_images), 3.25, dtype=np.float32)
    m = retrieval_metrics(sim, caption_image)
    # every other item ties with the right one and counts against it: the right one is ranked last
    assert t2i_ranks(sim, caption_image).tolist() == [n_images - 1] * len(caption_image)
    chance_t2i = {k: 100.0 * min(k, n_images) / n_images for k in (1, 5, 10)}
    for k in (1, 5, 10):
        assert m["t2i"][f"r{k}"] <= chance_t2i[k]
        # i2t: 5 right captions among 5N; chance that one of them is in the top k
        assert m["i2t"][f"r{k}"] <= 100.0 * min(1.0, 5 * k / (5 * n_images)) + 1e-9
    assert m["t2i"]["r1"] == 0.0 and m["i2t"]["r1"] == 0.0


def test_a_random_scorer_gets_chance_recall():
    rng = np.random.default_rng(0)
    n_images = 200
    caption_image = np.repeat(np.arange(n_images), 5)
    sim = rng.standard_normal((len(caption_image), n_images)).astype(np.float32)
    m = retrieval_metrics(sim, caption_image)
    assert m["t2i"]["r10"] == pytest.approx(100 * 10 / n_images, abs=2.5)


def test_an_image_without_captions_is_never_retrieved():
    caption_image = np.array([0, 0])
    sim = np.array([[0.9, 0.1], [0.8, 0.2]])
    assert i2t_ranks(sim, caption_image)[1] > 10**9


def test_precision_follows_the_cpu_and_the_override(monkeypatch):
    import torch

    from vlsearch.precision import autocast, compute_dtype, cpu_has_native_bf16, inference_copy, use_bf16

    monkeypatch.setenv("VLSEARCH_PRECISION", "auto")
    assert use_bf16() == cpu_has_native_bf16()
    monkeypatch.setenv("VLSEARCH_PRECISION", "fp32")
    lin = inference_copy(torch.nn.Linear(4, 4))
    assert lin.weight.dtype == torch.float32 and compute_dtype() == torch.float32
    with autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    monkeypatch.setenv("VLSEARCH_PRECISION", "bf16")
    lin = inference_copy(torch.nn.Linear(4, 4))
    assert lin.weight.dtype == torch.bfloat16
    with autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16

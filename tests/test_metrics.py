"""Recall computation against a hand-computed case."""

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
    # image columns: img0 scores [.9,.1,.2,.7,.3,.4]: its captions c0 (rank 0), c1 (rank 5) -> best 0
    # img1 [.1,.5,.8,.6,.2,.9]: c2 rank 1, c3 rank 2 -> 1 ; img2 [.2,.3,.1,.1,.1,.5]: c4 rank 3 (ties not above), c5 rank 0 -> 0
    assert i2t_ranks(sim, caption_image).tolist() == [0, 1, 0]
    m = retrieval_metrics(sim, caption_image)
    assert m["t2i"]["r1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i"]["r5"] == 100.0
    assert m["i2t"]["r1"] == pytest.approx(100 * 2 / 3)
    assert abs(m["rsum"] - (100 * 2 / 6 + 100 + 100 + 100 * 2 / 3 + 100 + 100)) < 1e-9

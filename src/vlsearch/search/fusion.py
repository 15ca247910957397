"""Fusing a pair scorer's scores with a dual encoder's: fused = fast_cosine + w * pair_score over the
dual encoder's top-K (Miech et al. 2021, Sec. 3.3), and placing the fused candidates above the rest.

``w`` is chosen on dev after training and saved in the pair scorer's config (``fusion_weight`` for
text-to-image, ``fusion_weight_i2t`` for image-to-text).
"""

from __future__ import annotations

import numpy as np


def fusion_weights(model) -> tuple[float, float]:
    return float(model.config.fusion_weight), float(model.config.fusion_weight_i2t)


def top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k highest values, best first."""
    k = min(k, sim.shape[1])
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sim, part, 1)
    return np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), 1)


def place_candidates(sim: np.ndarray, cand: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """sim with each row's candidates (cand [R,K]) set to their fused scores, ranked above every
    non-candidate of the row (whose order is kept)."""
    out = sim.astype(np.float64, copy=True)
    span = float(np.abs(sim).max(initial=0.0) + np.abs(fused).max(initial=0.0)) + 1.0
    out -= 2 * span  # non-candidates below any fused score
    np.put_along_axis(out, cand, fused.astype(np.float64), 1)
    return out


def fused_matrices(sim, cand_t2i, slow_t2i, cand_i2t, slow_i2t, w_t2i: float, w_i2t: float):
    fused_t2i = np.take_along_axis(sim, cand_t2i, 1) + w_t2i * slow_t2i
    sim_t2i = place_candidates(sim, cand_t2i, fused_t2i)
    fused_i2t = np.take_along_axis(sim.T, cand_i2t, 1) + w_i2t * slow_i2t
    sim_i2t = place_candidates(sim.T, cand_i2t, fused_i2t).T
    return sim_t2i, sim_i2t

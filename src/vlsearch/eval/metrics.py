"""Recall@K for cross-modal retrieval, the standard Flickr/COCO protocol (5 captions per image)."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def t2i_ranks(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """sim [captions, images]. Rank (0 = first) of each caption's image among all images."""
    gt = sim[np.arange(len(sim)), caption_image]
    return (sim > gt[:, None]).sum(1)


def i2t_ranks(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank of the best-ranked of each image's captions among all captions."""
    sim_i = sim.T  # [images, captions]
    ranks = np.full(sim_i.shape[0], np.iinfo(np.int64).max, dtype=np.int64)
    for c, i in enumerate(caption_image):
        ranks[i] = min(ranks[i], int((sim_i[i] > sim_i[i, c]).sum()))
    return ranks


def recalls(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    return {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def retrieval_metrics(sim: np.ndarray, caption_image: np.ndarray, sim_i2t: np.ndarray | None = None) -> dict:
    """{"t2i": {r1,r5,r10}, "i2t": {...}, "rsum", "mean_recall"} in percent.

    sim [captions, images] ranks both directions; re-ranking gives each direction its own matrix
    (rows re-scored for t2i, columns for i2t), passed as ``sim`` and ``sim_i2t``.
    """
    caption_image = np.asarray(caption_image)
    t2i = recalls(t2i_ranks(sim, caption_image))
    i2t = recalls(i2t_ranks(sim if sim_i2t is None else sim_i2t, caption_image))
    rsum = sum(t2i.values()) + sum(i2t.values())
    return {"t2i": t2i, "i2t": i2t, "rsum": rsum, "mean_recall": rsum / 6}

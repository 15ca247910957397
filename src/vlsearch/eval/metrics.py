"""Recall@K for cross-modal retrieval, the standard Flickr/COCO protocol (5 captions per image)."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def t2i_ranks(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """sim [captions, images]. Rank (0 = first) of each caption's image among all images.

    Ties count against the ground truth: the rank is the number of *other* images scoring >= the right
    one, so a scorer that gives every pair the same score ranks every image last (no credit for ties),
    and coarse scores (bf16 logits) cannot gain from them."""
    rows = np.arange(len(sim))
    gt = sim[rows, caption_image]
    return (sim >= gt[:, None]).sum(1) - 1  # minus the ground truth itself


def i2t_ranks(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank of the best-ranked of each image's captions among all captions.

    Ties count against the ground truth, as in ``t2i_ranks``: the rank is the number of the image's
    *wrong* captions scoring >= its best right caption (its other right captions are not counted)."""
    sim_i = np.asarray(sim).T  # [images, captions]
    caption_image = np.asarray(caption_image)
    right = np.zeros(sim_i.shape, dtype=bool)
    right[caption_image, np.arange(len(caption_image))] = True
    best = np.where(right, sim_i, -np.inf).max(1)
    ranks = ((sim_i >= best[:, None]) & ~right).sum(1)
    # an image without captions has no rank: never within any K
    ranks[~right.any(1)] = np.iinfo(np.int64).max
    return ranks.astype(np.int64)


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


def recall_vs_exact(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean share of each query's exact top-k (rows [Q,k]) that an approximate index also returned
    (recall@k against exact search: 1.0 = the index lost nothing)."""
    k = np.asarray(exact_rows).shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx_rows, exact_rows, strict=True)]))

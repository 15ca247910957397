"""What re-ranking costs per text query, measured with any pair scorer (``models/contracts.PairScorer``),
next to what the pair scorer alone would cost over the whole gallery (what re-ranking avoids)."""

from __future__ import annotations

import time

import numpy as np
import torch

from vlsearch.precision import autocast


def _one_text(model, feats, q: int):
    L = max(1, int(feats.lengths[q]))
    return model.text_state(feats.states[q : q + 1, :L], feats.lengths[q : q + 1])


def _images(feats, idx):
    return feats.grid[idx], None if feats.mid is None else feats.mid[idx]


@torch.no_grad()
def measure_costs(model, feats, K: int, n_queries: int = 8, gallery_sample: int = 256) -> dict:
    """Per text query, measured here (text token states come from the cache; the frozen MiniLM layers
    are part of the Fast encode time): re-ranking K images (text state + their image states + K pairs),
    also with image states cached; and the pair scorer alone over the whole gallery, extrapolated from
    ``gallery_sample`` images per query with image states precomputed (the favourable case)."""
    model.eval()
    N, M = feats.n_images, len(feats.states)
    rng = np.random.default_rng(0)
    queries = rng.choice(M, size=min(n_queries, M), replace=False)
    K = min(K, N)
    cold, warm = [], []
    with autocast():
        for n, q in enumerate(queries):
            imgs = torch.as_tensor(rng.choice(N, size=K, replace=False))
            t0 = time.perf_counter()
            text = _one_text(model, feats, int(q))
            t1 = time.perf_counter()
            image = model.image_state(*_images(feats, imgs))
            t2 = time.perf_counter()
            model.score(text, image)
            t3 = time.perf_counter()
            if n:  # the first one warms up
                cold.append(t3 - t0)
                warm.append((t1 - t0) + (t3 - t2))
        S = min(gallery_sample, N)
        sample = torch.as_tensor(rng.choice(N, size=S, replace=False))
        image = model.image_state(*_images(feats, sample))
        gallery = []
        for q in queries[: max(2, n_queries // 2)]:
            t0 = time.perf_counter()
            text = _one_text(model, feats, int(q))
            t_text = time.perf_counter() - t0
            for j0 in range(0, S, 64):
                model.score(text, image.rows(slice(j0, j0 + 64)))
            gallery.append((t_text, time.perf_counter() - t0 - t_text))
    t_text = float(np.median([g[0] for g in gallery]))
    per_pair = float(np.median([g[1] for g in gallery])) / S
    return {
        "rerank_k": K,
        "slow_pairs_per_query": K,
        "rerank_ms_per_query": 1e3 * float(np.median(cold or [0.0])),
        "rerank_ms_per_query_cached_images": 1e3 * float(np.median(warm or [0.0])),
        "slow_alone_pairs_per_query": N,
        "slow_alone_ms_per_query_gallery": 1e3 * (t_text + per_pair * N),
        "slow_alone_note": (
            f"extrapolated to {N} images from {S} sampled images x {len(gallery)} queries, "
            "image states precomputed (not counted)"
        ),
        "slow_compute_ratio_pairs": N / K,
    }

"""Fast+Slow with every candidate a distinct image whose features are on disk, not in memory.

In the bench galleries a synthetic row reuses the feature key of the real image it was drawn near, so a
query's K candidates share keys and the re-ranker computes each shared key once: fewer than K images.
Here each timed query's K candidates get features of their own (their source image's, perturbed, under a
key no other candidate has) in a store of their own, written in a random order so that a query's
candidates lie scattered over it as a gallery's top-K lie over its feature cache. The engine runs its
real path (``engine.search(..., rerank=K)`` through the project's ``Reranker``); only the keys it hands
the re-ranker are swapped, by position, for the candidates' own. The cold case drops the store's files
from the page cache (``posix_fadvise(DONTNEED)``) and the re-ranker's memo before every query, and counts
the bytes the query read from disk. With a model that has compact parts (the Slow model), the same
candidates are timed again from the compact store (int8 parts, encoders/compact.py), warm and cold.
"""

from __future__ import annotations

import time

import numpy as np

from vlsearch.bench.util import summarize
from vlsearch.encoders.features import FeatureExtractor
from vlsearch.models.contracts import has_compact_images
from vlsearch.search.rerank import Reranker


def read_bytes() -> int | None:
    """Bytes this process has read from storage so far (/proc/self/io), or None where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _OwnKeys:
    """Stands in for the engine's re-ranker: hands the real one each candidate's own key, by position."""

    def __init__(self, reranker: Reranker):
        self.reranker = reranker
        self.keys: list[str] = []

    def __getattr__(self, name):
        return getattr(self.reranker, name)

    def rerank_text(self, text, keys, fast_scores, explain: bool = False):
        return self.reranker.rerank_text(text, self.keys[: len(keys)], fast_scores, explain=explain)


def run(engine, reranker: Reranker, texts: list[str], K: int, work, seed: int = 0) -> dict:
    """p50/p99 of ``engine.search(t, k=10, rerank=K)`` with distinct candidates, page cache warm and cold
    (and from the compact store, for a model with compact parts): {case: {p50_ms, ..., disk_bytes_per_query,
    feature_bytes_per_image}}."""
    source = reranker.extractor.images
    own = FeatureExtractor(
        reranker.extractor.image_config,
        reranker.extractor.text_config,
        root=work / "own-features",
        progress=False,
    )
    rng = np.random.default_rng(seed)
    plans: list = []
    by_key: dict[str, dict] = {}  # key -> {"grid": row, "mid": row}
    for q, text in enumerate(texts):
        hits = engine.search(text, k=K).hits
        src = [r.key for r in engine.index.records(np.array([h.row for h in hits]))]
        keys = [f"q{q:04d}-c{j:03d}" for j in range(len(src))]
        for name in ("grid", "mid"):
            x = source.get_stacked(src, name).astype(np.float32)
            x *= 1.0 + 0.01 * rng.standard_normal(x.shape, dtype=np.float32)  # distinct items
            for k, row in zip(keys, x, strict=True):
                by_key.setdefault(k, {})[name] = row
        plans.append((text, keys, len(set(src))))
    # stored in a random order: a query's candidates lie scattered over the store, as a gallery's top-K
    # lie over its feature cache (written together, they would be read as one sequential run)
    order = list(by_key)
    rng.shuffle(order)
    for s in range(0, len(order), 256):
        part = order[s : s + 256]
        own.images.put(part, {n: [by_key[k][n] for k in part] for n in ("grid", "mid")})
    mine = Reranker(reranker.model, reranker.meta, reranker.path, extractor=own)
    cases = [("warm", mine, own.images), ("cold", mine, own.images)]
    if has_compact_images(reranker.model):  # the same candidates from the compact store (int8 parts)
        small = Reranker(reranker.model, reranker.meta, reranker.path, extractor=own, compact=True)
        small.fill_compact(order)  # index-time work, not timed; scattered in the same random order
        cases += [
            ("compact warm", small, small.compact_store()),
            ("compact cold", small, small.compact_store()),
        ]
    saved = engine.reranker
    out = {
        "K": K,
        "queries": len(texts),
        "shared_keys_in_gallery": float(np.mean([K - u for *_, u in plans])),
    }
    try:
        for case, rr, store in cases:
            engine.reranker = _OwnKeys(rr)
            ms, disk = [], []
            for text, keys, _ in [plans[0], *plans]:  # the first call is a warm-up
                engine.reranker.keys = keys
                rr.forget()
                if case.endswith("cold"):
                    store.evict_page_cache()
                b0 = read_bytes()
                t0 = time.perf_counter()
                result = engine.search(text, k=10, rerank=K)
                ms.append(1e3 * (time.perf_counter() - t0))
                b1 = read_bytes()
                disk.append(None if b0 is None or b1 is None else b1 - b0)
                assert all(h.slow_score is not None and np.isfinite(h.slow_score) for h in result.hits)
            ms, disk = ms[1:], disk[1:]
            out[case] = summarize(ms)
            known = [d for d in disk if d is not None]
            out[case]["disk_bytes_per_query"] = float(np.median(known)) if known else None
            out[case]["feature_bytes_per_image"] = store.bytes_per_item()
    finally:
        engine.reranker = saved
    return out

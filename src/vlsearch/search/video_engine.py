"""The engine's video queries: text or photo -> videos (with their best moment), -> moments, and
video -> captions, optionally re-ranked by the Slow model. Scoring lives in ``search.video``.

Video moments are scored exactly (one matrix-vector product over the index's stored fp16 moment
embeddings, in blocks), so the aggregation sees every moment of every video; photos in the same index
still come from the faiss index.
"""

from __future__ import annotations

import time

import numpy as np

from vlsearch.errors import QueryError
from vlsearch.index.vectors import inner_products
from vlsearch.models.embedder import check_query
from vlsearch.search.results import MAX_RERANK, CaptionHit, Hit, SearchResult, check_k
from vlsearch.search.video import (
    AGGREGATES,
    DEFAULT_AGGREGATE,
    VideoLayout,
    aggregate_matrix,
    best_moment,
    rescore_videos,
    top_moments,
)

BLOCK = 65536


def layout(engine) -> VideoLayout:
    cached = getattr(engine, "_video_layout", None)
    if cached is None or cached[0] is not engine.index:
        cached = (engine.index, VideoLayout.of_index(engine.index))
        engine._video_layout = cached
    return cached[1]


def _query_vector(engine, query, by_image: bool) -> np.ndarray:
    if by_image:
        return engine.embedder.embed_image(query)
    return engine.embedder.embed_query(check_query(query))


def row_scores(engine, q: np.ndarray) -> np.ndarray:
    """Cosine of the query with every video moment row (photo rows left at -inf)."""
    lay = layout(engine)
    emb = engine.index.embeddings
    out = np.full(len(emb), -np.inf, dtype=np.float32)
    for v in range(lay.n_videos):
        a, c = int(lay.first[v]), int(lay.count[v])
        for s in range(a, a + c, BLOCK):
            e = min(a + c, s + BLOCK)
            out[s:e] = inner_products(emb[s:e], q)
    return out


def _check_aggregate(how: str | None) -> str:
    how = how or DEFAULT_AGGREGATE
    if how not in AGGREGATES:
        raise QueryError(f"aggregate must be one of {', '.join(AGGREGATES)}, not {how!r}")
    return how


def _video_hit(engine, lay, v: int, scores: np.ndarray, score: float, fast=None, slow=None, row=None):
    rows = lay.rows(v)
    m = best_moment(lay, v, scores[rows])
    if row is not None and row != m.row:  # the Slow model preferred another frame: its span
        sub = scores[rows].copy()
        sub[int(row - rows[0])] = sub.max() + 1e-6
        m = best_moment(lay, v, sub)
    return Hit(
        m.row,
        lay.ids[v],
        lay.paths[v],
        float(score),
        fast if fast is not None else float(score),
        slow,
        "video",
        m.t_start,
        m.t_end,
        m.t_frame,
    )


def _slow_rows(engine, text: str):
    """slow_fn(rows) -> Slow scores of the text against those gallery rows' frames."""

    def fn(rows):
        keys = [r.key for r in engine.index.records(rows)]
        _, slow, _ = engine.reranker.rerank_text(text, keys, np.zeros(len(keys), np.float32))
        return slow

    return fn


def search_videos(engine, query, k: int = 10, rerank: int = 0, aggregate: str | None = None, by_image=None):
    k = check_k(k)
    how = _check_aggregate(aggregate)
    by_image = (not isinstance(query, str)) if by_image is None else by_image
    rerank = check_k(rerank, MAX_RERANK, "rerank") if rerank else 0
    if rerank and (engine.reranker is None or by_image):
        raise QueryError("re-ranking needs a text query and a Slow model (rerank_model='slow')")
    lay = layout(engine)
    t0 = time.perf_counter()
    q = _query_vector(engine, query, by_image)
    t1 = time.perf_counter()
    scores = row_scores(engine, q)
    vs = aggregate_matrix(scores[None], lay.first, lay.count, how)[0]
    order = np.argsort(-vs, kind="stable")
    timings = {"encode": (t1 - t0) * 1e3, "retrieve": (time.perf_counter() - t1) * 1e3}
    if rerank:
        t2 = time.perf_counter()
        cand = order[:rerank]
        fused, slow, best = rescore_videos(
            lay, scores, vs, cand, _slow_rows(engine, query), engine.reranker.model.config.fusion_weight
        )
        o = np.argsort(-fused, kind="stable")[:k]
        hits = [
            _video_hit(
                engine, lay, int(cand[i]), scores, fused[i], float(vs[cand[i]]), float(slow[i]), best[i]
            )
            for i in o
        ]
        timings["rerank"] = (time.perf_counter() - t2) * 1e3
    else:
        hits = [_video_hit(engine, lay, int(v), scores, float(vs[v])) for v in order[:k]]
    timings["total"] = (time.perf_counter() - t0) * 1e3
    return SearchResult(hits, timings)


def search_moments(engine, query, k: int = 10, by_image: bool = False):
    k = check_k(k)
    lay = layout(engine)
    t0 = time.perf_counter()
    scores = row_scores(engine, _query_vector(engine, query, by_image))
    hits = [
        Hit(
            m.row,
            lay.ids[m.video],
            lay.paths[m.video],
            m.score,
            m.score,
            None,
            "video",
            m.t_start,
            m.t_end,
            m.t_frame,
        )
        for m in top_moments(lay, scores, k)
    ]
    return SearchResult(hits, {"total": (time.perf_counter() - t0) * 1e3})


def search(engine, query, k: int, rerank: int = 0, explain: bool = False, by_image: bool = False):
    """Photos and videos ranked together (a video by its max moment score, so it is on the photos'
    scale; one hit per video). Re-ranking rescores photos and videos' best frames alike."""
    lay = layout(engine)
    t0 = time.perf_counter()
    q = _query_vector(engine, query, by_image)
    scores = row_scores(engine, q)
    vs = aggregate_matrix(scores[None], lay.first, lay.count, "max")[0] if lay.n_videos else np.zeros(0)
    n_photos = len(scores) - int(lay.count.sum())
    items: list[tuple[float, str, int]] = [(float(s), "video", v) for v, s in enumerate(vs)]
    if n_photos:
        want = min(len(scores), max(k, rerank) + min(4096, int(lay.count.sum())))
        ps, pr = engine.index.images.search(q[None], want)
        video_mask = lay.video_rows_mask(len(scores))
        items += [
            (float(s), "image", int(r))
            for s, r in zip(ps[0], pr[0], strict=True)
            if r >= 0 and not video_mask[r]
        ]
    items.sort(key=lambda x: -x[0])
    items = items[: max(k, rerank)]
    timings = {"retrieve": (time.perf_counter() - t0) * 1e3}
    photo_rows = [r for _, kind, r in items if kind == "image"]
    photo_recs = dict(zip(photo_rows, engine.index.records(photo_rows), strict=True))
    hits, explanations = [], None
    for s, kind, r in items:
        if kind == "image":
            rec = photo_recs[r]
            hits.append(Hit(r, rec.id, rec.path, s, s))
        else:
            hits.append(_video_hit(engine, lay, r, scores, s))
    if rerank:
        keys = [rec.key for rec in engine.index.records([h.row for h in hits])]
        fused, slow, explanations = engine.reranker.rerank_text(
            query, keys, [h.score for h in hits], explain=explain
        )
        for h, f, sl in zip(hits, fused, slow, strict=True):
            h.score, h.fast_score, h.slow_score = float(f), h.score, float(sl)
        order = np.argsort(-fused, kind="stable")[:k]
        hits = [hits[i] for i in order]
        explanations = [explanations[i] for i in order] if explanations is not None else None
    hits = hits[:k]
    timings["total"] = (time.perf_counter() - t0) * 1e3
    return SearchResult(hits, timings, explanations)


def captions_for_video(engine, video_id: str, k: int = 5, aggregate: str | None = None):
    """Video-to-text: each caption of the index scored against the video's moments, aggregated."""
    k = check_k(k)
    lay = layout(engine)
    if video_id not in lay.ids:
        raise QueryError(f"no video {video_id!r} in the index")
    captions = engine.index.captions
    if captions is None or len(captions) == 0:
        return SearchResult([], {})
    t0 = time.perf_counter()
    v = lay.ids.index(video_id)
    rows = lay.rows(v)
    emb = np.asarray(engine.index.embeddings[rows[0] : rows[-1] + 1], dtype=np.float32)
    cap = captions.reconstruct_all()
    agg = aggregate_matrix(cap @ emb.T, [0], [len(rows)], _check_aggregate(aggregate))[:, 0]
    agg[captions.deleted()] = -np.inf  # captions of deleted images
    top = np.argsort(-agg, kind="stable")[: min(k, len(captions))]
    texts = engine.index.caption_rows(top)
    hits = [CaptionHit(int(r), t, int(i), float(agg[r])) for r, (t, i) in zip(top, texts, strict=True)]
    return SearchResult(hits, {"total": (time.perf_counter() - t0) * 1e3})

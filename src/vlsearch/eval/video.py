"""`vlsearch eval --data-root DIR` on a video caption dataset (data/video_dataset.py): text-to-video and
video-to-text R@1/5/10 for each moment aggregation, moment R@1 at IoU >= 0.5 / 0.7 where spans are given,
and optionally Slow re-ranking of the top-K videos. Metrics reuse eval/metrics.py (ties count against
the ground truth)."""

from __future__ import annotations

import sys
import time

import numpy as np

from vlsearch.data.images import ImageReport
from vlsearch.data.video import SamplingConfig
from vlsearch.data.video_dataset import load_video_captions
from vlsearch.encoders.video import videos_frames
from vlsearch.eval.metrics import recalls, retrieval_metrics, t2i_ranks
from vlsearch.models.embedder import Embedder
from vlsearch.models.registry import load_model, resolve_checkpoint
from vlsearch.search.fusion import place_candidates
from vlsearch.search.rerank import Reranker
from vlsearch.search.video import (
    AGGREGATES,
    DEFAULT_AGGREGATE,
    RERANK_FRAMES,
    VideoLayout,
    aggregate_matrix,
    iou,
    rescore_videos,
    top_moments,
)

IOUS = (0.5, 0.7)


def moment_recall(layout: VideoLayout, sim: np.ndarray, caption_video, spans, ks=(1, 5)) -> dict:
    """Moment R@k at each IoU: a caption is found when one of the k best moments over all videos is in
    its video and overlaps its span by IoU >= the threshold."""
    has = ~np.isnan(spans).any(1)
    if not has.any():
        return {}
    hits = {(k, t): 0 for k in ks for t in IOUS}
    for c in np.flatnonzero(has):
        top = top_moments(layout, sim[c], max(ks))
        ious = [
            iou((m.t_start, m.t_end), tuple(spans[c])) if m.video == caption_video[c] else 0.0 for m in top
        ]
        for k in ks:
            for t in IOUS:
                hits[(k, t)] += any(x >= t for x in ious[:k])
    n = int(has.sum())
    return {
        "n_queries": n,
        **{f"r{k}_iou{int(t * 100)}": 100.0 * hits[(k, t)] / n for k in ks for t in IOUS},
    }


def evaluate_video(
    data_root,
    model: str = "fast",
    rerank: int = 0,
    rerank_model: str | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    aggregate: str = DEFAULT_AGGREGATE,
    progress: bool = True,
    rerank_queries: int | None = None,
    seed: int = 0,
) -> dict:
    t_start = time.perf_counter()
    ds = load_video_captions(data_root)
    net, meta, ckpt = load_model(model)
    embedder = Embedder(net, progress=progress)
    report = ImageReport()
    frames = videos_frames(embedder.extractor, ds.video_paths, sampling, report)
    if report:
        print(report.summary(), file=sys.stderr)
    ds = ds.without_videos({i for i, f in enumerate(frames) if f is None})
    frames = [f for f in frames if f is not None]
    counts = np.array([len(f.times) for f in frames], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    spans = [m for f in frames for m in f.moments]
    layout = VideoLayout(
        list(ds.video_ids),
        [str(p) for p in ds.video_paths],
        first,
        counts,
        np.array([a for a, _ in spans]),
        np.array([b for _, b in spans]),
    )
    t_feat = time.perf_counter()
    frame_emb = embedder.embed_keys([k for f in frames for k in f.frame_keys])
    cap_emb = embedder.embed_texts(ds.captions)
    sim = cap_emb @ frame_emb.T  # [captions, moments]
    result: dict = {
        "model": str(model),
        "checkpoint": str(ckpt),
        "dataset": ds.name,
        "n_videos": ds.n_videos,
        "n_captions": len(ds.captions),
        "n_frames": int(counts.sum()),
        "sampling": sampling.tag,
        "aggregate": aggregate,
        "aggregates": {},
    }
    by_how = {}
    for how in AGGREGATES:
        by_how[how] = aggregate_matrix(sim, first, counts, how)
        m = retrieval_metrics(by_how[how], ds.caption_video)
        result["aggregates"][how] = {"t2v": m["t2i"], "v2t": m["i2t"], "rsum": m["rsum"]}
    main = result["aggregates"][aggregate]
    result.update({"t2v": main["t2v"], "v2t": main["v2t"], "rsum": main["rsum"]})
    moments = moment_recall(layout, sim, ds.caption_video, ds.spans)
    if moments:
        result["moments"] = moments
    if rerank:
        queries = np.arange(len(ds.captions))
        if rerank_queries and rerank_queries < len(queries):
            queries = np.sort(np.random.default_rng(seed).choice(len(queries), rerank_queries, replace=False))
        result["rerank"] = rerank_videos(
            embedder,
            layout,
            frames,
            sim,
            by_how[aggregate],
            ds,
            rerank,
            rerank_model or "slow",
            progress,
            queries,
        )
    result["cost"] = {
        "frames_s": t_feat - t_start,
        "total_s": time.perf_counter() - t_start,
    }
    return result


def rerank_videos(
    embedder, layout, frames, sim, video_sim, ds, K: int, rerank_model: str, progress: bool, queries
):
    """Text-to-video with the Slow model rescoring each caption's top-K videos' best frames, on the
    captions ``queries`` (Fast alone is reported on the same captions, for the comparison)."""
    from tqdm import tqdm

    rr = Reranker.load(resolve_checkpoint(rerank_model), extractor=embedder.extractor)
    keys = np.array([k for f in frames for k in f.frame_keys])
    w = float(rr.model.config.fusion_weight)
    K = min(K, layout.n_videos)
    sim, video_sim = sim[queries], video_sim[queries]
    captions = [ds.captions[c] for c in queries]
    caption_video = ds.caption_video[queries]
    cand = np.argsort(-video_sim, axis=1, kind="stable")[:, :K]
    fused = np.zeros(cand.shape, np.float32)
    t0 = time.perf_counter()
    pairs = 0
    for c in tqdm(range(len(sim)), desc="slow re-rank", disable=not progress, file=sys.stderr):

        def slow_fn(rows, c=c):
            _, slow, _ = rr.rerank_text(captions[c], list(keys[rows]), np.zeros(len(rows), np.float32))
            return slow

        f, _, _ = rescore_videos(layout, sim[c], video_sim[c], cand[c], slow_fn, w)
        fused[c] = f
        pairs += int(np.minimum(RERANK_FRAMES, layout.count[cand[c]]).sum())
    elapsed = time.perf_counter() - t0

    reranked = place_candidates(video_sim, cand, fused)
    return {
        "K": K,
        "model": rerank_model,
        "n_queries": len(queries),
        "fast_t2v": recalls(t2i_ranks(video_sim, caption_video)),
        "t2v": recalls(t2i_ranks(reranked, caption_video)),
        "slow_pairs_per_query": pairs / max(1, len(sim)),
        "ms_per_query": 1e3 * elapsed / max(1, len(sim)),
    }

"""`vlsearch eval`: Recall@1/5/10 both directions on a dataset split, with per-query costs.

Dual encoders (fast, fast-distilled, deformer) embed every image and caption once; pair scorers (slow,
deformer-joint) score every (caption, image) pair; ``rerank=K`` rescores each query's Fast top-K with a
pair scorer. Costs are measured on this machine, per query, and labelled when extrapolated.
"""

from __future__ import annotations

import time

import numpy as np

from vlsearch.data import load_dataset
from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.errors import DataError, QueryError
from vlsearch.eval.metrics import recall_vs_exact, retrieval_metrics
from vlsearch.index.vectors import make_vector_index
from vlsearch.models.contracts import is_pair_scorer
from vlsearch.models.embed import embed_features
from vlsearch.models.embedder import Embedder
from vlsearch.models.fast import set_concepts, set_hubness
from vlsearch.models.registry import load_model
from vlsearch.search.pair_scoring import rerank_eval, score_all_pairs


def measure_query_cost(embedder: Embedder, image_emb: np.ndarray, captions: list[str], n: int = 20) -> dict:
    """Fast cost per text query: encode the text (uncached) and exact search over this gallery."""
    queries = captions[:n] or ["a dog runs on the grass"]
    embedder.embed_query(queries[0])  # warm-up
    t0 = time.perf_counter()
    q = np.stack([embedder.embed_query(t) for t in queries])
    t1 = time.perf_counter()
    index = make_vector_index(image_emb.shape[1], len(image_emb), "flat")
    index.add(image_emb)
    for row in q:
        index.search(row[None], 10)
    t2 = time.perf_counter()
    return {
        "fast_encode_ms": 1e3 * (t1 - t0) / len(queries),
        "fast_search_ms": 1e3 * (t2 - t1) / len(queries),
    }


def live_query_embeddings(embedder: Embedder, captions: list[str], progress: bool) -> np.ndarray:
    """Each caption through ``embed_query``, one at a time, as the service and the CLI run a query."""
    from tqdm import tqdm

    rows = tqdm(captions, desc="live queries", disable=not progress, leave=False)
    return np.stack([embedder.embed_query(c) for c in rows])


def ann_metrics(image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray, kind: str) -> dict:
    """t2i recall through an approximate index, and its recall@10 against exact search."""
    k = 10
    approx = make_vector_index(image_emb.shape[1], len(image_emb), kind)
    approx.add(image_emb)
    _, rows = approx.search(text_emb, k)
    exact = np.argsort(-(text_emb @ image_emb.T), axis=1)[:, :k]
    overlap = recall_vs_exact(rows, exact)
    hit_rank = np.array([list(r).index(g) if g in r else k for r, g in zip(rows, caption_image, strict=True)])
    return {
        "index": approx.kind,
        "ann_recall_at_10_vs_exact": float(overlap),
        "t2i_ann": {f"r{kk}": float(100 * np.mean(hit_rank < kk)) for kk in (1, 5, 10)},
    }


def evaluate(
    data_root=None,
    split: str = "dev",
    model: str = "fast",
    images: int | None = None,
    seed: int = 0,
    rerank: int = 0,
    rerank_model: str | None = None,
    index_kind: str = "flat",
    progress: bool = True,
    concepts: bool = True,
    dataset=None,
    rerank_features: str = "full",
    live_queries: bool = False,
    hubness: bool = True,
) -> dict:
    """``concepts=False`` switches a Fast model's concept channel off (as ``index --no-concepts``);
    ``hubness=False`` its hubness prior (models/hubness.py).
    ``live_queries``: each caption is embedded as a user's query is, one at a time from raw text through
    the query runtime (an int8 graph where one is in use), not from the cached text features; this is
    what shows a runtime's effect on recall.
    ``rerank_features="compact"``: the re-ranker reads its images' int8 parts, as from a compact store
    (encoders/compact.py)."""
    dataset = dataset or load_dataset(data_root, split)
    if images:
        dataset = dataset.sample(images, seed)
    if not dataset.captions:
        raise DataError(f"{dataset.name} split {split!r} has no captions to evaluate with")
    net, meta, ckpt = load_model(model)

    concepts_on = set_concepts(net, concepts)
    hubness_on = set_hubness(net, hubness)
    result: dict = {
        "model": str(model),
        "checkpoint": str(ckpt),
        "split": dataset.split,
        "dataset": dataset.name,
        "concepts": concepts_on,
        "concept_weight": getattr(net.config, "concept_weight", 0.0) if concepts_on else 0.0,
        "hubness_weight": getattr(net.config, "hubness_weight", 0.0) if hubness_on else 0.0,
    }
    feats = DatasetFeatures.load(dataset, mid=True, progress=progress)
    caption_image = feats.caption_image.numpy()
    cost: dict = {}
    sim_i2t = None
    if is_pair_scorer(net):
        t0 = time.perf_counter()
        sim = score_all_pairs(net, feats, progress=progress)
        elapsed = time.perf_counter() - t0
        n_pairs = sim.size
        cost["pairs_per_s"] = n_pairs / elapsed
        cost["slow_ms_per_query_gallery"] = 1e3 * elapsed / len(feats.states)
        cost["note"] = f"scored all {n_pairs} pairs; per query = all {feats.n_images} gallery images"
    else:
        embedder = Embedder(net, progress=progress)

        img, txt = embed_features(net, feats)
        if live_queries:
            txt = live_query_embeddings(embedder, dataset.captions, progress)
            graph = embedder.query_graph()
            result["query_path"] = {
                "runtime": embedder.query_runtime if graph is not None else "torch",
                "precision": graph.precision if graph is not None else "as cached features",
            }
        sim = txt @ img.T
        cost.update(measure_query_cost(embedder, img, dataset.captions))
        cost["bytes_per_image"] = int(img.shape[1] * 4)  # the faiss Flat vector (fp32)
        if index_kind != "flat":
            result.update(ann_metrics(img, txt, caption_image, index_kind))
        if rerank:
            if rerank_features not in ("full", "compact"):
                raise QueryError(f"rerank features must be 'full' or 'compact', not {rerank_features!r}")
            sim, sim_i2t, rerank_cost = rerank_eval(
                rerank_model or "slow", feats, sim, rerank, progress, compact=rerank_features == "compact"
            )
            cost.update(rerank_cost)
            result["rerank"] = rerank
            result["rerank_model"] = rerank_model or "slow"
            result["rerank_features"] = rerank_features
    metrics = retrieval_metrics(sim, caption_image, sim_i2t)
    result.update(metrics)
    result.update({"n_images": feats.n_images, "n_captions": len(caption_image), "cost": cost})
    return result

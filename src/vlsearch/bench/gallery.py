"""Query latency, recall of the approximate indexes, build time and memory, per gallery size and index kind.

For every gallery size: the gallery (real Fast embeddings, then synthetic ones near them) is written as a
real index folder (faiss + SQLite metadata + fp16 memory-mapped embeddings), opened by a real
``SearchEngine``, and every index kind is built over it, timed, sized, and queried with held-out captions:
text in, ids out (encoding, search, metadata lookup; Fast+Slow also the Slow re-ranking of the top K).
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from pathlib import Path

import faiss
import torch

from vlsearch.bench import rerank_cold
from vlsearch.bench.hardware import Floors
from vlsearch.bench.index_scale import _billion_probe, _params
from vlsearch.bench.photos import date_filter, synthetic_photos
from vlsearch.bench.util import PeakRSS, best_threads, count_flops, latencies, rss_bytes, summarize
from vlsearch.eval.metrics import recall_vs_exact
from vlsearch.index.gallery import GalleryIndex
from vlsearch.index.plain import ImageRecord, IndexConfig, write_gallery
from vlsearch.index.vectors import make_vector_index
from vlsearch.precision import autocast
from vlsearch.search.engine import SearchEngine

KINDS = ("flat", "hnsw", "ivfflat", "ivfsq", "ivfpq")
RERANK_KS = (10, 50, 100)


def _touched_bytes(vi, n: int, d: int, k: int, ndis: float | None) -> float:
    """Bytes one query must read from memory in this index (the bandwidth floor's numerator)."""
    kind = vi.kind
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return (ndis or 0) * d * 4
    ivf = faiss.extract_index_ivf(vi.index)
    coarse = ivf.nlist * d * 4
    frac = min(1.0, ivf.nprobe / ivf.nlist)
    code = ivf.code_size
    if kind in ("ivfflat", "ivfsq"):
        return coarse + frac * n * code
    return coarse + frac * n * code + k * getattr(vi, "k_factor", 1) * d * 2


def _cold(engine):
    """Empty the re-ranker's per-image key/value memo: every query computes its K images' keys/values from
    the feature cache, as in a large gallery where the candidates rarely repeat (the bench's synthetic rows
    reuse the real images' features, so a warm memo would flatter it)."""
    if engine.reranker is not None:
        engine.reranker.forget()
    return engine


def _query_flops(embedder, text: str) -> float:
    """One query's FLOPs, counted on the PyTorch fp32 query path (the exported graph the query runs
    through is invisible to the counter, which then read 0)."""
    path = embedder.fp32_query_path(bool(getattr(embedder.model, "concepts_active", False)))
    ids = embedder.extractor.text_backbone.tokenize([text])
    with torch.no_grad():
        return count_flops(lambda: path(ids["input_ids"], ids["attention_mask"]))


def _slow_alone(engine, reranker_model, data, n: int, texts: list[str]) -> dict:
    """Score every gallery image against the query with the pair scorer alone (from cached features,
    through its PairScorer calls; image states computed per query, as no gallery could keep them all),
    keep the top 10."""
    ex = engine.embedder.extractor
    store = ex.images
    keys = engine.index.all_keys()[:n]
    mid_all = torch.from_numpy(store.get_stacked(keys, "mid")).float()
    grid_all = torch.from_numpy(store.get_stacked(keys, "grid")).float()
    batch = 256

    @torch.no_grad()
    def query(text):
        states, lengths, _ = ex.encode_texts([text])
        scores = []
        with autocast():
            tstate = reranker_model.text_state(torch.from_numpy(states).float(), torch.from_numpy(lengths))
            for s in range(0, n, batch):
                image = reranker_model.image_state(grid_all[s : s + batch], mid_all[s : s + batch])
                scores.append(reranker_model.score(tstate, image).reshape(-1).float())
        top = torch.topk(torch.cat(scores), min(10, n)).indices.numpy()
        return engine.index.records(top)

    lat = latencies(query, texts, warmup=1, budget_s=60.0, min_n=2)
    lat["pairs_per_s"] = n / (lat["mean_ms"] / 1e3)
    return lat


def run(
    data,
    engine_parts,
    floors: Floors,
    sizes: list[int],
    work: Path,
    quick: bool,
    reranker=None,
    slow=None,
    slow_pair_gflops: float | None = None,
    token_bytes: int = 0,
    progress: bool = True,
) -> dict:
    """engine_parts: (embedder, model name, model fingerprint). Returns latency/recall/index sections."""
    embedder, model_name, fingerprint = engine_parts
    n_fast = 8 if quick else 200
    n_rerank = 2 if quick else 30
    rerank_ks = RERANK_KS[:2] if quick else RERANK_KS
    warmup = 1 if quick else 2
    budget = 5.0 if quick else 15.0  # seconds per latency measurement (at least 5 queries each)
    rerank_budget = 5.0 if quick else 8.0
    n_recall = min(100 if quick else 1000, len(data.query_embeddings))
    n_slow_alone = 2 if quick else 3
    texts = data.captions(max(n_fast, n_rerank))
    qemb = data.query_embeddings[:n_recall]
    d = data.embeddings.shape[1]
    query_gflops = _query_flops(embedder, texts[0]) / 1e9
    # One query is a small batch: intra-op threads may cost more than they give (the service runs each
    # request on one thread). Measure 1 thread vs all cores for each pipeline and use the faster.
    cores = torch.get_num_threads()
    candidates = sorted({1, cores})
    fast_threads, fast_probe = best_threads(lambda: embedder.embed_query(texts[0]), candidates)
    rerank_threads, rerank_probe = None, None
    rows, recall, index_rows, gallery_rows = [], [], [], []
    billion = None
    slow_alone = None
    largest = None

    t_start = time.perf_counter()

    def log(msg):
        if progress:
            print(f"bench: {msg} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)

    for n in sizes:
        emb, source, gmeta = data.gallery(n)
        folder = work / f"gallery-{n}"
        records = [
            ImageRecord(data.ids[s] if i < data.n_real else f"synthetic-{i:07d}", data.paths[s], data.keys[s])
            for i, s in enumerate(source)
        ]
        config = IndexConfig(
            model=model_name,
            model_type=embedder.model.model_type,
            model_fingerprint=fingerprint,
            dim=d,
            kind="flat",
            image_backbone=embedder.extractor.image_config.tag,
            text_backbone=embedder.extractor.text_config.tag,
            source=f"vlsearch bench: {gmeta['real']} real + {gmeta['synthetic']} synthetic",
        )
        log(f"gallery {n:,}: writing index folder")
        rss0 = rss_bytes()
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            write_gallery(folder, config, records, emb, photos=synthetic_photos(n))
            write_s = time.perf_counter() - t0
        del records
        gc.collect()
        sizes_on_disk = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        gallery_rows.append(
            {
                "n": n,
                **{k: gmeta[k] for k in ("real", "synthetic", "neighbour_cosine", "sigma")},
                "write_s": write_s,
                "write_s_per_million": write_s * 1e6 / n,
                "write_peak_rss_increase_gb": (peak.peak - rss0) / 1e9,
                "sqlite_bytes_per_image": sizes_on_disk.get("meta.sqlite", 0) / n,
                "embeddings_fp16_bytes_per_image": sizes_on_disk.get("embeddings.npy", 0) / n,
            }
        )
        gallery = GalleryIndex.open(folder)
        engine = SearchEngine(gallery, embedder, reranker)
        exact = gallery.images
        _, exact_rows = exact.search(qemb, 10)
        for kind in KINDS:
            log(f"gallery {n:,}: {kind}: build")
            if kind == "flat":
                t0 = time.perf_counter()
                make_vector_index(d, n, "flat").add(emb)
                build_s = time.perf_counter() - t0
                vi = exact
                path = folder / "images.faiss"
            else:
                rss0 = rss_bytes()
                with PeakRSS() as peak:
                    t0 = time.perf_counter()
                    vi = make_vector_index(d, n, kind)
                    vi.add(emb)
                    build_s = time.perf_counter() - t0
                path = folder / f"images.{kind}.faiss"
                vi.write(path)
                vi.attach_vectors(gallery.embeddings)  # as GalleryIndex.open does
            index_rows.append(
                {
                    "n": n,
                    "kind": kind,
                    "build_s": build_s,
                    "build_s_per_million": build_s * 1e6 / n,
                    "index_bytes": path.stat().st_size,
                    "index_bytes_per_image": path.stat().st_size / n,
                    "index_gb_per_million": path.stat().st_size / n * 1e6 / 1e9,
                    "build_peak_rss_increase_gb": (peak.peak - rss0) / 1e9 if kind != "flat" else None,
                    "params": _params(vi),
                }
            )
            engine.index.images = vi
            log(f"gallery {n:,}: {kind}: queries")
            # retrieval alone (one embedded query at a time), with HNSW's distance count for the floor
            faiss.cvar.hnsw_stats.reset()
            ret = latencies(lambda q, vi=vi: vi.search(q[None], 10), list(qemb[:n_fast]), warmup)
            ndis = faiss.cvar.hnsw_stats.ndis / (ret["n_queries"] + warmup) if kind == "hnsw" else None
            touched = _touched_bytes(vi, n, d, 10, ndis)
            torch.set_num_threads(fast_threads)
            fast = latencies(lambda t, e=engine: e.search(t, k=10), texts[:n_fast], warmup, budget)
            torch.set_num_threads(cores)
            scan_floor = floors.scan_ms(n * d * 4)
            enc_floor = floors.flop_ms(query_gflops * 1e9)
            row = {
                "n": n,
                "kind": kind,
                "pipeline": "fast",
                **fast,
                "retrieve_p50_ms": ret["p50_ms"],
                "floor_ms": enc_floor + floors.scan_ms(touched),
                "scan_all_fp32_floor_ms": scan_floor,
                "encode_flop_floor_ms": enc_floor,
                "bytes_touched": touched,
            }
            rows.append(row)
            if kind == "flat":
                log(f"gallery {n:,}: 1% date filter")
                rows.append(_filtered_row(engine, n, texts[:n_fast], warmup, budget, fast_threads, cores))
            if n_recall:
                _, approx_rows = vi.search(qemb, 10)
                r = recall_vs_exact(approx_rows, exact_rows)
                recall.append({"n": n, "kind": kind, "recall_at_10_vs_exact": r, "queries": n_recall})
            if reranker is not None:
                if rerank_threads is None:
                    rerank_threads, rerank_probe = best_threads(
                        lambda e=engine, n=n: _cold(e).search(texts[0], k=10, rerank=min(50, n)),
                        candidates,
                        3,
                    )
                torch.set_num_threads(rerank_threads)
                for K in rerank_ks:
                    if K > n:
                        continue
                    lat = latencies(
                        lambda t, K=K, e=engine: _cold(e).search(t, k=10, rerank=K),
                        texts[:n_rerank],
                        warmup,
                        rerank_budget,
                    )
                    pair_ms = floors.flop_ms(K * (slow_pair_gflops or 0) * 1e9)
                    rows.append(
                        {
                            "n": n,
                            "kind": kind,
                            "pipeline": f"fast+slow K={K}",
                            "K": K,
                            **lat,
                            "floor_ms": row["floor_ms"] + pair_ms + floors.scan_ms(K * token_bytes),
                            "scan_all_fp32_floor_ms": scan_floor,
                            "encode_flop_floor_ms": enc_floor,
                            "slow_flop_floor_ms": pair_ms,
                        }
                    )
                if 50 <= n:
                    log(f"gallery {n:,}: {kind}: Fast+Slow K=50, distinct candidates, warm and cold")
                    dist = rerank_cold.run(engine, reranker, texts[:n_rerank], 50, work / "own")
                    shutil.rmtree(work / "own", ignore_errors=True)
                    for case in [c for c in ("warm", "cold", "compact warm", "compact cold") if c in dist]:
                        rows.append(
                            {
                                "n": n,
                                "kind": kind,
                                "pipeline": f"fast+slow K=50, distinct, {case}",
                                "K": 50,
                                **dist[case],
                                "shared_keys_in_gallery": dist["shared_keys_in_gallery"],
                                "feature_bytes_per_image": dist[case]["feature_bytes_per_image"],
                            }
                        )
                torch.set_num_threads(cores)
            if kind == "ivfpq" and n == sizes[-1]:
                billion = _billion_probe(vi, qemb[: min(50, len(qemb))], n, d, fast, ret)
            if kind != "flat":
                engine.index.images = exact
                vi = None
                gc.collect()
        if slow is not None and slow.available and slow_alone is None:
            log(f"gallery {n:,}: Slow alone")
            try:
                slow_alone = {"n": n, **_slow_alone(engine, slow.model, data, n, texts[:n_slow_alone])}
            except Exception as e:  # noqa: BLE001 - a model being written may change its interface
                slow_alone = {"n": n, "error": f"{type(e).__name__}: {e}"}
        largest = (n, folder)
        engine.index.close()
        engine = gallery = exact = emb = None
        gc.collect()
        if n != sizes[-1]:
            shutil.rmtree(folder, ignore_errors=True)
    # Slow alone: measured at the first size, extrapolated from its pairs/s beyond (stated so)
    if slow_alone and "pairs_per_s" in slow_alone:
        fast_encode = next(r for r in rows if r["pipeline"] == "fast" and r["kind"] == "flat")["p50_ms"]
        for n in sizes:
            measured = n == slow_alone["n"]
            p50 = slow_alone["p50_ms"] if measured else fast_encode + 1e3 * n / slow_alone["pairs_per_s"]
            rows.append(
                {
                    "n": n,
                    "kind": "none",
                    "pipeline": "slow alone",
                    "p50_ms": p50,
                    "p99_ms": slow_alone["p99_ms"] if measured else None,
                    "n_queries": slow_alone["n_queries"] if measured else 0,
                    "extrapolated": not measured,
                    "note": "measured"
                    if measured
                    else f"extrapolated: n / {slow_alone['pairs_per_s']:.0f} pairs/s measured at {slow_alone['n']:,}",
                    "floor_ms": floors.flop_ms(n * (slow_pair_gflops or 0) * 1e9)
                    + floors.scan_ms(n * token_bytes),
                    "scan_all_fp32_floor_ms": floors.scan_ms(n * d * 4),
                }
            )
    return {
        "latency": rows,
        "recall": recall,
        "index": index_rows,
        "galleries": gallery_rows,
        "slow_alone_measured": slow_alone,
        "query_gflops": query_gflops,
        "largest": {"n": largest[0], "folder": str(largest[1])} if largest else None,
        "billion_ivfpq": billion,
        "queries": {"fast": n_fast, "rerank": n_rerank, "recall": n_recall, "budget_s": budget},
        "query_threads": {
            "fast": fast_threads,
            "fast_probe_ms": fast_probe,
            "fast+slow": rerank_threads,
            "fast+slow_probe_ms": rerank_probe,
        },
    }


def _filtered_row(
    engine, n: int, texts: list[str], warmup: int, budget: float, threads: int, cores: int
) -> dict:
    """A text query filtered to a date range holding 1% of the gallery, end to end (encode included)."""
    f = date_filter(n)
    matching = len(engine.index.filter_rows(f))
    got = []

    def query(t):
        got.append(len(engine.search(t, k=10, filters=f).hits))

    torch.set_num_threads(threads)
    lat = latencies(query, texts, warmup, budget)
    torch.set_num_threads(cores)
    return {
        "n": n,
        "kind": "flat",
        "pipeline": "fast, 1% date filter",
        **lat,
        "matching": matching,
        "all_k": all(g == min(10, matching) for g in got),
    }


__all__ = ["run", "summarize"]

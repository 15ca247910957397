"""What the concept channel costs: bytes per image in the index and work per query, on and off.

Measured on the model being benchmarked, switched on and off at run time (as ``index --no-concepts``):
a query's end-to-end encode (tokenise + MiniLM lower layers + towers), the image tower per image, and the
vector an index stores per image.
"""

from __future__ import annotations

import time

import numpy as np

from vlsearch.models.embedder import Embedder
from vlsearch.models.fast import set_concepts


def _p50_ms(fn, items) -> float:
    fn(items[0])  # warm-up
    times = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def measure(net, extractor, queries: list[str], grid: np.ndarray) -> dict:
    """{"available", "rows": {"on"/"off": {dim, bytes_per_image_fp32, bytes_per_image_fp16,
    query_encode_p50_ms, image_tower_ms_per_image}}, "weight"}; queries: distinct texts."""
    if getattr(net, "concept", None) is None or not getattr(net.config, "concept_weight", 0):
        return {"available": False, "note": "model has no concept channel (or weight 0)"}
    rows = {}
    for label, on in (("off", False), ("on", True)):
        set_concepts(net, on)
        emb = Embedder(net, extractor=extractor, progress=False)
        q = _p50_ms(emb.embed_query, queries)
        t0 = time.perf_counter()
        out = emb._image(grid)
        per_image = (time.perf_counter() - t0) * 1e3 / len(grid)
        rows[label] = {
            "dim": int(out.shape[1]),
            "bytes_per_image_fp32": int(out.shape[1] * 4),  # faiss Flat / HNSW vectors
            "bytes_per_image_fp16": int(out.shape[1] * 2),  # the index's stored embeddings
            "query_encode_p50_ms": q,
            "image_tower_ms_per_image": per_image,
        }
    set_concepts(net, True)
    return {"available": True, "weight": net.config.concept_weight, "rows": rows, "n_queries": len(queries)}


def table(result: dict) -> str:
    if not result.get("available"):
        return f"Concept channel: {result.get('note', 'not measured')}\n"
    lines = [
        f"Concept channel cost (weight {result['weight']:g}; query p50 over {result['n_queries']} texts):",
        "",
        "| concepts | dim | bytes/image (faiss fp32) | bytes/image (stored fp16) | query encode p50 ms | image tower ms/image |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in result["rows"].items():
        lines.append(
            f"| {label} | {r['dim']} | {r['bytes_per_image_fp32']} | {r['bytes_per_image_fp16']} | "
            f"{r['query_encode_p50_ms']:.2f} | {r['image_tower_ms_per_image']:.3f} |"
        )
    return "\n".join(lines) + "\n"

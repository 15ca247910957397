"""What an index's parameters are, and what one query would cost at a billion images, from a measured
index (the gallery rows of `vlsearch bench`)."""

from __future__ import annotations

import faiss
import numpy as np

from vlsearch.bench.util import latencies


def _billion_probe(vi, queries: np.ndarray, n: int, d: int, fast: dict, ret: dict) -> dict:
    """What one query costs in a billion-image IVF-PQ index, from work measured on this one.

    With 65,536 lists over 1e9 vectors (~15k per list) and the same nprobe, a query scans
    nprobe * 1e9 / 65,536 codes. Here that many codes (capped at all of them) are scanned by raising
    nprobe on the measured index; the coarse search over 65,536 centroids is timed on its own.
    """
    ivf = faiss.extract_index_ivf(vi.index)
    nlist_b, n_b = 65_536, 1_000_000_000
    codes_b = ivf.nprobe * n_b / nlist_b
    per_list = n / ivf.nlist
    old = ivf.nprobe
    probe = int(min(ivf.nlist, max(old, round(codes_b / per_list))))
    ivf.nprobe = probe
    scan = latencies(lambda q: vi.search(q[None], 10), list(queries), warmup=2)
    ivf.nprobe = old
    coarse = faiss.IndexFlatIP(d)
    cents = np.random.default_rng(0).standard_normal((nlist_b, d)).astype(np.float32)
    coarse.add(cents / np.linalg.norm(cents, axis=1, keepdims=True))
    coarse_ms = latencies(lambda q: coarse.search(q[None], old), list(queries), warmup=2)["p50_ms"]
    encode_ms = max(0.0, fast["p50_ms"] - ret["p50_ms"])
    bytes_per_image = ivf.code_size + 8  # PQ code + its 64-bit id in the inverted list
    return {
        "extrapolated": True,
        "nlist": nlist_b,
        "nprobe": old,
        "codes_scanned_per_query": codes_b,
        "measured_on": f"{n:,} images with nprobe={probe} of {ivf.nlist} lists ({probe * per_list:,.0f} codes)",
        "scan_and_recheck_p50_ms": scan["p50_ms"],
        "coarse_65536_flat_p50_ms": coarse_ms,
        "text_encode_p50_ms": encode_ms,
        "query_p50_ms_estimate": encode_ms
        + coarse_ms
        + scan["p50_ms"] * codes_b / max(1.0, probe * per_list),
        "ram_gb": (bytes_per_image * n_b + nlist_b * d * 4) / 1e9,
        "ram_bytes_per_image": bytes_per_image,
        "fp16_recheck_vectors_gb_on_ssd": n_b * d * 2 / 1e9,
        "recheck_reads_per_query": 10 * getattr(vi, "k_factor", 1),
        "note": "estimate for one machine, one query thread, codes in RAM, fp16 vectors memory-mapped "
        "(here from page cache; on SSD add the random reads of the re-check)",
    }


def _params(vi) -> dict:
    if vi.kind == "hnsw":
        h = vi.index.hnsw
        return {"M": h.nb_neighbors(1), "efConstruction": h.efConstruction, "efSearch": h.efSearch}
    if vi.kind in ("ivfflat", "ivfsq", "ivfpq"):
        ivf = faiss.extract_index_ivf(vi.index)
        out = {"nlist": ivf.nlist, "nprobe": ivf.nprobe}
        if vi.kind == "ivfpq":
            out.update({"code_bytes": ivf.code_size, "k_factor": getattr(vi, "k_factor", 1)})
        return out
    return {}

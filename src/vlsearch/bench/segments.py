"""Segmented index writes and reads at scale: adding 1,000 images to an N-image index (beyond feature
extraction), deleting one, and Fast p50 over 20 segments against one compacted segment.

The galleries are the bench's own (``BenchData.gallery``: real Fast embeddings, then distinct synthetic
rows near them, each its own id), written as real index folders and opened by a real ``SearchEngine``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from vlsearch.bench.photos import synthetic_photos
from vlsearch.bench.util import latencies
from vlsearch.index.plain import ImageRecord, IndexConfig, write_gallery
from vlsearch.search.engine import SearchEngine

N_ADD, N_SEGMENTS = 1_000, 20
TARGET_ADD_S, TARGET_DELETE_MS, TARGET_RATIO = 10.0, 100.0, 1.5


def _records(data, source, start: int) -> list[ImageRecord]:
    return [
        ImageRecord(data.ids[s] if i < data.n_real else f"synthetic-{i:07d}", data.paths[s], data.keys[s])
        for i, s in enumerate(source, start)
    ]


def _config(engine_parts, d: int, kind: str) -> IndexConfig:
    embedder, model_name, fingerprint = engine_parts
    return IndexConfig(
        model=model_name,
        model_type=embedder.model.model_type,
        model_fingerprint=fingerprint,
        dim=d,
        kind=kind,
        image_backbone=embedder.extractor.image_config.tag,
        text_backbone=embedder.extractor.text_config.tag,
        source="vlsearch bench: segments",
    )


def _write_segmented(folder: Path, config: IndexConfig, parts: list[tuple[list, np.ndarray, list]]) -> None:
    """A segmented index of the given (records, embeddings, photos) parts, one segment each."""
    from dataclasses import asdict

    from vlsearch.index.manifest import LAYOUT, Manifest, new_segment_name, write_manifest

    folder.mkdir(parents=True)
    names = []
    for recs, emb, photos in parts:
        name = new_segment_name()
        write_gallery(
            folder / name, IndexConfig(**{**asdict(config), "n_images": 0}), recs, emb, photos=photos
        )
        names.append(name)
    cfg = asdict(config)
    cfg.update(kind=LAYOUT, n_images=sum(len(r) for r, _, _ in parts), dim=parts[0][1].shape[1])
    write_manifest(folder, Manifest(cfg, names, {}, 1))


def run(
    data, engine_parts, work: Path, n: int, quick: bool, kind: str = "flat", progress: bool = True
) -> dict:
    """Rows: add 1,000 to an n-image index, delete one, Fast p50 at n over 20 segments vs compacted."""
    from vlsearch.index.update import add_records, compact, remove_ids

    t_start = time.perf_counter()

    def log(msg):
        if progress:
            print(
                f"bench segments: {msg} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True
            )

    emb, source, gmeta = data.gallery(n + N_ADD)
    d = emb.shape[1]
    config = _config(engine_parts, d, kind)
    photos = list(synthetic_photos(n + N_ADD))
    recs = _records(data, source[:n], 0)
    new = _records(data, source[n:], n)
    for r in new:  # the added rows are other files than the gallery's
        r.path = f"{r.path}#added-{r.id}"
    out: dict = {"n": n, "kind": kind, "gallery": gmeta, "rows": []}

    log(f"{N_SEGMENTS} segments of {n // N_SEGMENTS:,}")
    seg = work / f"segments-{n}"
    bounds = np.linspace(0, n, N_SEGMENTS + 1).astype(int)
    parts = [(recs[a:b], emb[a:b], photos[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    t0 = time.perf_counter()
    _write_segmented(seg, config, parts)
    write_s = time.perf_counter() - t0
    del parts
    os.sync()  # the gallery's own GBs reach the disk here, not inside the first timed fsync of the add

    # adding 1,000 embedded images: one new segment (its features are extracted before, not counted)
    log("add 1,000")
    t0 = time.perf_counter()
    added = add_records(seg, new, emb[n:], photos[n:])
    add_s = time.perf_counter() - t0
    assert added == N_ADD, added
    # deleting one image by id: tombstones in the manifest
    log("delete one (x20)")
    del_ms = []
    for i in range(20):
        t0 = time.perf_counter()
        assert remove_ids(seg, [new[i].id]) == [new[i].id]
        del_ms.append(1e3 * (time.perf_counter() - t0))

    engine_seg = _engine(seg, engine_parts)
    texts = data.captions(60 if quick else 200)
    budget = 5.0 if quick else 15.0
    log("Fast p50 over 21 segments")
    lat_seg = latencies(lambda t: engine_seg.search(t, 10), texts, warmup=2, budget_s=budget)
    ids_seg = [h.id for h in engine_seg.search(texts[0], 10).hits]
    n_segments = len(engine_seg.index.shards)
    engine_seg.index.close()
    log("compact")
    t0 = time.perf_counter()
    res = compact(seg, kind=kind)
    compact_s = time.perf_counter() - t0
    engine_one = _engine(seg, engine_parts)
    log("Fast p50 over the compacted segment")
    lat_one = latencies(lambda t: engine_one.search(t, 10), texts, warmup=2, budget_s=budget)
    same = [h.id for h in engine_one.search(texts[0], 10).hits] == ids_seg
    engine_one.index.close()
    shutil.rmtree(seg, ignore_errors=True)
    ratio = lat_seg["p50_ms"] / lat_one["p50_ms"]
    out.update(
        write_segments_s=write_s,
        add_1000_s=add_s,
        delete_one_ms={"p50": float(np.median(del_ms)), "max": float(np.max(del_ms)), "n": len(del_ms)},
        fast_segmented=lat_seg | {"segments": n_segments, "deleted_rows": 20},
        fast_compacted=lat_one,
        p50_ratio=ratio,
        same_top10=same,
        compact_s=compact_s,
        compacted=res,
    )
    out["rows"] = [
        {
            "what": f"add {N_ADD:,} embedded images to a {n:,}-image index",
            "value": add_s,
            "unit": "s",
            "target": f"< {TARGET_ADD_S:.0f} s",
            "met": add_s < TARGET_ADD_S,
        },
        {
            "what": f"delete one image (of {n + N_ADD:,}), p50 of 20",
            "value": out["delete_one_ms"]["p50"],
            "unit": "ms",
            "target": f"< {TARGET_DELETE_MS:.0f} ms",
            "met": out["delete_one_ms"]["max"] < TARGET_DELETE_MS,
        },
        {
            "what": f"Fast p50, {n_segments} segments / 1 compacted ({kind}, {n:,} images)",
            "value": ratio,
            "unit": "x",
            "target": f"<= {TARGET_RATIO}x",
            "met": ratio <= TARGET_RATIO,
            "detail": f"{lat_seg['p50_ms']:.1f} ms vs {lat_one['p50_ms']:.1f} ms",
        },
    ]
    return out


def _engine(path: Path, engine_parts) -> SearchEngine:
    from vlsearch.index.gallery import GalleryIndex

    return SearchEngine(GalleryIndex.open(path), engine_parts[0])


def table(section: dict) -> str:
    lines = ["| segmented index | measured | target | |", "|---|---|---|---|"]
    for r in section["rows"]:
        v = f"{r['value']:.2f} {r['unit']}" + (f" ({r['detail']})" if r.get("detail") else "")
        lines.append(f"| {r['what']} | {v} | {r['target']} | {'MET' if r['met'] else 'NOT MET'} |")
    return "\n".join(lines) + "\n"

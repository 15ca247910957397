"""`vlsearch bench`: every section in one run on this machine; JSON + PNG + markdown table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlsearch.bench import concepts as concept_cost
from vlsearch.bench import gallery, hardware, photos, runtimes, service, throughput, video
from vlsearch.bench import models as M
from vlsearch.bench.concepts import table as concept_table
from vlsearch.bench.data import BenchData
from vlsearch.bench.hardware import Floors
from vlsearch.bench.pipeline import make_reranker
from vlsearch.bench.report import markdown, plot
from vlsearch.encoders import runtime as R
from vlsearch.encoders.compact import part_bytes
from vlsearch.errors import CheckpointError
from vlsearch.index.vectors import AUTO_THRESHOLD
from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.models.contracts import has_compact_images
from vlsearch.models.embedder import Embedder
from vlsearch.models.fast import FastConfig, FastModel
from vlsearch.models.registry import fingerprint, load_model
from vlsearch.settings import configure_torch

FULL_SIZES = [1_000, 10_000, 100_000, 1_000_000]
QUICK_SIZES = [500, 2_000]
TARGET_FAST_MS, TARGET_RERANK_MS, TARGET_RECALL = 15.0, 100.0, 0.95


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _set_threads(threads: int) -> None:
    os.environ["VLSEARCH_THREADS"] = str(threads)
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def _fast_model(name: str, work: Path):
    """(model, name to record, fingerprint, note). An untrained Fast model when none is trained (stated)."""

    try:
        net, _, path = load_model(name)
        return net, str(name), fingerprint(path), f"checkpoint {path}"
    except CheckpointError as e:
        net = FastModel(FastConfig(), init_from_pretrained=True)
        path = save_checkpoint(work / "fast-untrained", net)
        return (
            net,
            str(path),
            fingerprint(path),
            f"UNTRAINED Fast model ({e}): recall figures use its embeddings",
        )


def rerank_storage(slow, data) -> dict:
    """Bytes per gallery image the Slow model needs at query time, and how they are stored."""
    store = data.embedder.extractor.images
    grid = data.grid(1)[0]
    mid = data.mid(1)[0]
    grid_b, mid_b = grid.nbytes, mid.nbytes
    cfg = getattr(slow.model, "config", None) if slow is not None and slow.available else None
    use_grid = bool(getattr(cfg, "use_grid", True))
    raw = mid_b + (grid_b if use_grid else 0)
    what = f"fp16 mid {mid.shape[0]}x{mid.shape[1]}" + (
        f" + grid {grid.shape[0]}x{grid.shape[1]}" if use_grid else ""
    )
    note = ""
    if cfg is not None and has_compact_images(slow.model):
        full, raw = raw, part_bytes(slow.model.compact_shapes())
        what = (
            "int8 compact parts ("
            + ", ".join(f"{name} {n}x{d}" for name, (n, d) in slow.model.compact_shapes().items())
            + ", one fp32 scale per token; encoders/compact.py)"
        )
        note = f"the full maps ({full:,} B) stay in the feature cache for indexing only"
    elif cfg is None:
        note = "Slow model not available: the feature cache's grid + mid maps are counted."
    on_disk = None
    try:
        files = list(store.root.glob("chunk-*.npy"))
        n_items = len(store)
        if n_items:
            on_disk = sum(f.stat().st_size for f in files) / n_items
    except OSError:
        pass
    return {
        "bytes_per_image": int(raw),
        "what": what,
        "gb_per_million": raw * 1e6 / 1e9,
        "grid_bytes": int(grid_b),
        "mid_bytes": int(mid_b),
        "cache_bytes_per_image_on_disk": on_disk,
        "note": note,
    }


TARGET_RERANK_COLD_MS = 60.0  # issue 19: 1M images, distinct candidates, cold features
TARGET_FAST_STRICT_MS = 5.0  # issue 19: 1M images, text encoding included
TARGET_RERANK_BYTES = 48 * 1024  # issue 19: re-ranking features per image


def _targets(result: dict) -> dict:
    n = result["gallery_sizes"][-1]
    lat = [x for x in result["latency"] if x["n"] == n]
    rec = {x["kind"]: x["recall_at_10_vs_exact"] for x in result["recall"] if x["n"] == n}
    fast = {x["kind"]: x for x in lat if x["pipeline"] == "fast"}
    k50 = {x["kind"]: x for x in lat if x["pipeline"] == "fast+slow K=50"}
    lines = []
    scope = "" if n >= 1_000_000 else f" (at {n:,} images, not the 1M target: run the full bench)"
    ok = {k: v for k, v in fast.items() if rec.get(k, 0) >= TARGET_RECALL}
    best = min(ok.values(), key=lambda x: x["p50_ms"]) if ok else None
    met_fast = best is not None and best["p50_ms"] < TARGET_FAST_MS
    if best:
        lines.append(
            f"Fast p50 (text encoding included) < {TARGET_FAST_MS:.0f} ms{scope}: "
            f"{'MET' if met_fast else 'NOT MET'} with {best['kind']} ({best['p50_ms']:.1f} ms, p99 {best['p99_ms']:.1f} ms, "
            f"recall@10 {rec[best['kind']]:.3f}); "
            + ", ".join(f"{k} {v['p50_ms']:.1f} ms" for k, v in fast.items())
        )
        lines.append(
            f"Fast p50 <= {TARGET_FAST_STRICT_MS:.0f} ms with recall@10 >= {TARGET_RECALL}{scope}: "
            f"{'MET' if best['p50_ms'] <= TARGET_FAST_STRICT_MS else 'NOT MET'} with {best['kind']} "
            f"({best['p50_ms']:.1f} ms)"
        )
    okr = {k: v for k, v in k50.items() if rec.get(k, 0) >= TARGET_RECALL}
    bestr = min(okr.values(), key=lambda x: x["p50_ms"]) if okr else None
    met_rerank = bestr is not None and bestr["p50_ms"] < TARGET_RERANK_MS
    if bestr:
        lines.append(
            f"Fast+Slow(K=50) p50 < {TARGET_RERANK_MS:.0f} ms{scope}: {'MET' if met_rerank else 'NOT MET'} with "
            f"{bestr['kind']} ({bestr['p50_ms']:.1f} ms, p99 {bestr['p99_ms']:.1f} ms); "
            + ", ".join(f"{k} {v['p50_ms']:.1f} ms" for k, v in k50.items())
        )
    else:
        lines.append("Fast+Slow(K=50): not measured (no Slow model available)")
    for features, pipeline in (("full", "distinct, cold"), ("compact", "distinct, compact cold")):
        cold = {x["kind"]: x for x in lat if x["pipeline"] == f"fast+slow K=50, {pipeline}"}
        okc = {k: v for k, v in cold.items() if rec.get(k, 0) >= TARGET_RECALL}
        bestc = min(okc.values(), key=lambda x: x["p50_ms"]) if okc else None
        if bestc:
            disk = bestc.get("disk_bytes_per_query")
            size = bestc.get("feature_bytes_per_image")
            lines.append(
                f"Fast+Slow(K=50) p50 <= {TARGET_RERANK_COLD_MS:.0f} ms with 50 distinct candidates, {features} "
                f"features not in the page cache{scope}: "
                f"{'MET' if bestc['p50_ms'] <= TARGET_RERANK_COLD_MS else 'NOT MET'} with "
                f"{bestc['kind']} ({bestc['p50_ms']:.1f} ms, p99 {bestc['p99_ms']:.1f} ms"
                + (f", {disk / 1e6:.2f} MB read from disk per query" if disk is not None else "")
                + (
                    f"; the 50 Slow pairs' FLOP floor alone is {k50[bestc['kind']]['slow_flop_floor_ms']:.0f} ms"
                    " on this machine"
                    if k50.get(bestc["kind"], {}).get("slow_flop_floor_ms")
                    else ""
                )
                + "); "
                + ", ".join(f"{k} {v['p50_ms']:.1f} ms" for k, v in cold.items())
            )
            if features == "compact" and size:
                lines.append(
                    f"re-ranking features <= {TARGET_RERANK_BYTES // 1024} KB per image: "
                    f"{'MET' if size <= TARGET_RERANK_BYTES else 'NOT MET'} ({size / 1024:.1f} KiB on disk per image, "
                    f"{size * 1e6 / 1e9:.1f} GB per million images; recall: `vlsearch eval --rerank 20 "
                    "--rerank-features compact`)"
                )
    approx = {k: v for k, v in rec.items() if k != "flat"}
    met_recall = {k: v >= TARGET_RECALL for k, v in approx.items()}
    lines.append(
        f"approximate recall@10 vs exact >= {TARGET_RECALL}{scope}: "
        + ", ".join(f"{k} {v:.3f} ({'MET' if v >= TARGET_RECALL else 'NOT MET'})" for k, v in approx.items())
    )
    return {
        "n": n,
        "fast_p50_ms": best["p50_ms"] if best else None,
        "fast_kind": best["kind"] if best else None,
        "fast_met": met_fast,
        "fast_slow_k50_p50_ms": bestr["p50_ms"] if bestr else None,
        "fast_slow_kind": bestr["kind"] if bestr else None,
        "fast_slow_met": met_rerank,
        "recall_met": met_recall,
        "lines": lines,
    }


def run_bench(
    out: str | Path = "bench-results",
    quick: bool = False,
    data_root=None,
    model: str = "fast",
    sizes: list[int] | None = None,
    threads: int | None = None,
    serve: bool = True,
    progress: bool = True,
) -> dict:

    t_start = time.time()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    threads = threads or os.cpu_count() or 1
    configure_torch()
    _set_threads(threads)

    sections: dict[str, float] = {}
    mark = [time.time(), "setup"]

    def log(msg: str) -> None:
        sections[mark[1]] = time.time() - mark[0]
        mark[:] = [time.time(), msg]
        if progress:
            print(f"bench: {msg} ({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)

    sizes = sorted(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    result: dict = {
        "meta": {
            "command": "vlsearch bench" + (" --quick" if quick else ""),
            "argv": sys.argv,
            "quick": quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "git_commit": _git_commit(),
            "runtime": {graph: R.resolve(None, graph) for graph in R.PREFERENCE},
            "query_int8": R.query_int8(R.resolve(None, "query")),  # text queries in int8 (runtime.py)
            "threads": threads,
            "load_average_start": hardware.load_average(),
            "background": hardware.busy_processes(),
        },
        "gallery_sizes": sizes,
    }
    try:
        log("measuring memory bandwidth and matmul rate")
        result["hardware"] = hw = hardware.measure(quick)
        floors = Floors(hw)
        net, model_name, fp, note = _fast_model(model, work)
        result["meta"]["fast_model"] = note
        embedder = Embedder(net, progress=False)
        data = BenchData.load(
            embedder,
            data_root,
            max_queries=200 if quick else 1000,
            max_images=max(sizes) if quick else None,
            progress=progress,
        )
        result["meta"]["dataset"] = (
            f"{data.dataset.name} ({data.n_real} images, {len(data.queries)} query captions)"
        )
        log("concept channel cost")

        result["concepts"] = concept_cost.measure(
            net, embedder.extractor, data.captions(20 if quick else 100), data.grid(64)
        )
        log("encoder throughput")
        result["encoders"] = throughput.encoders(data, net, floors, quick)
        log("inference runtimes: PyTorch, ONNX Runtime, OpenVINO side by side")
        result["runtimes"] = runtimes.run(data, net, work, quick)
        log("photos: indexing 12 MP JPEGs, old path and new")
        result["photos_decode"] = photos.decode_section(data, embedder, work, quick)
        log("pair-scoring throughput")
        result["pair_scoring"] = pairs = throughput.pair_scoring(data, floors, quick)
        ips = runtimes.in_use_images_per_s(result["runtimes"])  # the runtime indexing runs on
        result["embed_cost"] = {
            "images_per_s": ips,
            "hours_per_million": 1e6 / ips / 3600,
            "runtime": result["runtimes"]["in_use"]["image"],
        }
        log("video indexing: throughput, bytes per hour, peak RSS")

        result["video"] = video.run(data, embedder, work, quick, ips)
        slow = M.slow_model()
        reranker, rerank_note = make_reranker(slow, embedder.extractor, work)
        result["rerank"] = {"available": reranker is not None, "implementation": rerank_note}
        result["rerank_storage"] = storage = rerank_storage(slow, data)
        slow_row = pairs["rows"].get("slow", {})
        log("galleries: latency, recall, build time, memory")
        g = gallery.run(
            data,
            (embedder, model_name, fp),
            floors,
            sizes,
            work,
            quick,
            reranker=reranker,
            slow=slow,
            slow_pair_gflops=slow_row.get("gflops_per_item"),
            token_bytes=storage["bytes_per_image"],
            progress=progress,
        )
        for key in (
            "latency",
            "recall",
            "index",
            "galleries",
            "slow_alone_measured",
            "query_gflops",
            "queries",
            "query_threads",
            "billion_ivfpq",
        ):
            result[key] = g[key]
        log("segmented index: add 1,000, delete one, 20 segments vs compacted")
        from vlsearch.bench import segments

        result["segments"] = segments.run(
            data, (embedder, model_name, fp), work, max(sizes), quick, progress=progress
        )
        if serve and g["largest"]:
            n = g["largest"]["n"]
            rec = {x["kind"]: x["recall_at_10_vs_exact"] for x in g["recall"] if x["n"] == n}
            fast = {x["kind"]: x["p50_ms"] for x in g["latency"] if x["n"] == n and x["pipeline"] == "fast"}
            # serve what one would: the fastest index that keeps recall (exact below the auto threshold)
            good = [k for k in fast if rec.get(k, 0) >= TARGET_RECALL and k != "flat"]
            kind = min(good, key=fast.get) if (good and n >= AUTO_THRESHOLD) else "flat"
            log(f"service memory ({kind} index of {n:,} images)")
            result["service"] = service.measure(
                Path(g["largest"]["folder"]), kind, work, embedder, data.captions(20 if quick else 100)
            )
        result["targets"] = _targets(result)
        result["targets"]["lines"] += photos.targets(result)
        q_gflops = result.get("query_gflops")
        q_floor = Floors(result["hardware"]).flop_ms(q_gflops * 1e9) if q_gflops else None
        result["targets"]["lines"] += runtimes.targets(result.get("runtimes"), q_floor)
        result["targets"]["lines"] += throughput.pair_targets(result.get("pair_scoring"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("report")
    result["meta"]["section_seconds"] = sections
    result["meta"]["seconds"] = time.time() - t_start
    result["meta"]["load_average_end"] = hardware.load_average()
    png = plot(result, out / "bench.png")
    result["plot"] = str(png)
    table = markdown(result)
    if "concepts" in result:
        table += "\n" + concept_table(result["concepts"])
    if "runtimes" in result:
        table += "\n" + runtimes.table(result["runtimes"])
    if "segments" in result:
        from vlsearch.bench.segments import table as segments_table

        table += "\n" + segments_table(result["segments"])
    result["table"] = table
    (out / "bench.md").write_text(f"Command: `{result['meta']['command']}`\n\n" + table)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _json_default(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)

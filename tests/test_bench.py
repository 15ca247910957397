"""`vlsearch bench --quick` end to end (no timing assertions), and the index kinds it compares."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlsearch.cli import main


def test_bench_quick_writes_json_plot_and_table(
    tiny_fast_checkpoint, slow_checkpoint, mini_flickr, tmp_path, capsys, monkeypatch
):
    """This test's home holds the named `fast` and `slow` models and no `deformer-joint`: the Slow rows
    use that checkpoint (re-ranking measured), the deformer row random weights (speed only)."""
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make bench` passes
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--out", "bench", "--data-root", str(mini_flickr), "--sizes", "60,300"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "### Query latency" in printed and "CLIP ViT-B/32" in printed
    result = json.loads((out / "bench.json").read_text())
    for key in (
        "meta",
        "hardware",
        "encoders",
        "pair_scoring",
        "latency",
        "recall",
        "index",
        "galleries",
        "rerank",
        "rerank_storage",
        "embed_cost",
        "service",
        "targets",
        "plot",
        "table",
    ):
        assert key in result, key
    hw = result["hardware"]
    assert hw["memory"]["read_gbs"] > 0 and hw["matmul_tflops_bf16"] > 0 and hw["matmul_tflops_fp32"] > 0
    enc = result["encoders"]["rows"]
    for key in ("ours_image", "ours_text", "clip_image", "clip_text"):
        assert enc[key].get("images_per_s", enc[key].get("texts_per_s")) > 0
        assert enc[key]["gflops_per_item"] > 0
    assert set(result["encoders"]["ratios"]) == {"image_ours_over_clip", "text_ours_over_clip"}
    pairs = result["pair_scoring"]["rows"]
    assert pairs["blip_itm"]["pairs_per_s"] > 0
    for key in ("slow", "deformer_joint"):  # always measured: a missing checkpoint means random weights
        assert pairs[key]["available"] is True and pairs[key]["pairs_per_s"] > 0, pairs[key]
    assert pairs["slow"]["weights"].startswith("checkpoint "), pairs["slow"]
    assert pairs["deformer_joint"]["weights"].startswith("random weights"), pairs["deformer_joint"]
    kinds = {"flat", "hnsw", "ivfflat", "ivfsq", "ivfpq"}
    assert result["gallery_sizes"] == [60, 300]
    fast = [r for r in result["latency"] if r["pipeline"] == "fast"]
    assert {(r["n"], r["kind"]) for r in fast} == {(n, k) for n in (60, 300) for k in kinds}
    for r in fast:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["floor_ms"] > 0 and r["scan_all_fp32_floor_ms"] > 0
    assert {(r["n"], r["kind"]) for r in result["recall"]} == {(n, k) for n in (60, 300) for k in kinds}
    assert all(r["recall_at_10_vs_exact"] == 1.0 for r in result["recall"] if r["kind"] == "flat")
    assert {(r["n"], r["kind"]) for r in result["index"]} == {(n, k) for n in (60, 300) for k in kinds}
    assert all(r["index_bytes_per_image"] > 0 for r in result["index"])
    assert result["rerank"]["available"] is True, result["rerank"]
    assert result["rerank"]["implementation"].startswith("vlsearch.search.rerank.Reranker (checkpoint ")
    assert any(r["pipeline"] == "fast+slow K=10" for r in result["latency"])
    assert any(r["pipeline"] == "slow alone" and r.get("extrapolated") for r in result["latency"])
    assert 0 < result["rerank_storage"]["bytes_per_image"] <= 48 * 1024  # the Slow model's compact parts
    for case, low, high in (("cold", 150_000, 200_000), ("compact cold", 1, 48 * 1024)):
        rows = [r for r in result["latency"] if r["pipeline"] == f"fast+slow K=50, distinct, {case}"]
        assert {r["n"] for r in rows} == {60, 300}, case
        assert all(low <= r["feature_bytes_per_image"] <= high and r["p50_ms"] > 0 for r in rows), rows
    assert result["service"]["peak_rss_gb"] > 0
    assert result["targets"]["lines"]
    png = out / "bench.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.md").read_text().startswith("Command: `vlsearch bench --quick`")
    assert not (out / ".work").exists()


@pytest.mark.parametrize("kind", ["hnsw", "ivfflat", "ivfsq", "ivfpq"])
def test_approximate_kinds_find_the_exact_neighbours(kind, tmp_path):
    """Clustered unit vectors (as embeddings are): each kind keeps most of the exact top-10, and an index
    folder of it re-opens with the same answers (IVF-PQ re-checks against the memory-mapped embeddings)."""
    from vlsearch.index.gallery import GalleryIndex, ImageRecord, IndexConfig, write_gallery
    from vlsearch.index.vectors import make_vector_index

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64)).astype(np.float32)
    x = centres[rng.integers(0, 50, 3000)] + 0.3 * rng.standard_normal((3000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:100] + 0.1 * rng.standard_normal((100, 64)).astype(np.float32)
    exact = make_vector_index(64, len(x), "flat")
    exact.add(x)
    _, want = exact.search(q, 10)
    vi = make_vector_index(64, len(x), kind)
    assert vi.kind == kind
    vi.add(x)
    scores, rows = vi.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, want, strict=True)])
    assert recall >= 0.9, recall
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    config = IndexConfig("m", "fast", "0", 64, kind, "img", "txt")
    recs = [ImageRecord(str(i), f"/x/{i}.jpg", f"k{i}") for i in range(len(x))]
    write_gallery(tmp_path / "idx", config, recs, x)
    idx = GalleryIndex.open(tmp_path / "idx")
    assert idx.config.kind == kind and len(idx.images) == len(x)
    _, again = idx.images.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(again, want, strict=True)]) >= recall - 0.05

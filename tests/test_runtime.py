"""Inference runtimes (encoders/runtime.py): ONNX Runtime and OpenVINO give PyTorch's answers on real
photos and real captions, cache their exports, fall back to PyTorch, and are safe across threads."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import FLICKR, need_data
from vlsearch.data.images import load_image
from vlsearch.encoders import runtime as R
from vlsearch.encoders.image import ImageBackbone, ImageBackboneConfig
from vlsearch.errors import VLSearchError
from vlsearch.models.embedder import Embedder
from vlsearch.models.fast import FastConfig, FastModel

GRAPH_RUNTIMES = [r for r in ("onnxruntime", "openvino") if R.available(r)]
# fp32 graphs match PyTorch fp32 to rounding; bf16 (OpenVINO on an AMX CPU) within what bf16 gives
# int8 (a text query on ONNX Runtime without native bf16): min 0.980 over Flickr8k dev with `fast`
COS_MIN = {"fp32": 0.99999, "bf16": 0.99, "int8": 0.95}  # PyTorch bf16 (autocast) itself: min 0.9976


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


@pytest.fixture(scope="module")
def photos():
    need_data()
    files = sorted((FLICKR / "Flicker8k_Dataset").glob("*.jpg"))[:6]
    return np.stack([load_image(f, 224) for f in files])


@pytest.fixture(scope="module")
def fast():
    torch.manual_seed(0)
    return FastModel(FastConfig(concepts=True, concept_weight=0.3)).eval()


@pytest.fixture(scope="module")
def captions():
    need_data()
    lines = (FLICKR / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines()[:400:7]
    return [line.split("\t")[1] for line in lines]


def test_runtime_choice():
    assert R.resolve("auto") in R.RUNTIMES
    assert R.resolve("torch") == "torch"
    with pytest.raises(VLSearchError, match="unknown runtime"):
        R.resolve("tensorrt")
    tags = {R.tag(r) for r in R.RUNTIMES if R.available(r)}
    assert len(tags) == len([r for r in R.RUNTIMES if R.available(r)])  # each runtime its own cache folder
    assert ImageBackboneConfig(runtime="torch").tag.endswith(("-b10", "-b10-bf16"))  # earlier caches stay


@pytest.mark.parametrize("runtime", GRAPH_RUNTIMES)
def test_image_backbone_matches_pytorch_fp32(runtime, photos, fast):
    ref = ImageBackbone(ImageBackboneConfig(runtime="torch", bf16=False))
    want = ref.encode_numpy(photos)
    backbone = ImageBackbone(ImageBackboneConfig(runtime=runtime))
    got = backbone.encode_numpy(photos)
    assert backbone.compiled() is not None and backbone.runtime == runtime
    assert got["grid"].shape == want["grid"].shape and got["mid"].shape == want["mid"].shape
    bound = COS_MIN[R.precision(runtime)]
    with torch.no_grad():
        e_ref = fast.encode_image(torch.from_numpy(want["grid"]), None).numpy()
        e_got = fast.encode_image(torch.from_numpy(got["grid"]), None).numpy()
    assert _cos(e_got, e_ref).min() >= bound
    assert _cos(got["mid"].mean(1), want["mid"].mean(1)).min() >= bound
    # one image at a time gives the batch's answer (query images run one by one)
    one = backbone.encode_numpy(photos[:1])
    assert _cos(one["grid"][0], got["grid"][0]).min() >= 0.999
    with pytest.raises(VLSearchError, match=r"\[B,224,224,3\]"):
        backbone.encode_numpy(photos[:, :200])


@pytest.mark.parametrize("runtime", GRAPH_RUNTIMES)
def test_text_query_graph_matches_pytorch_fp32(runtime, fast, captions, monkeypatch):
    """The runtime's fp32 (or bf16) graph; the int8 one has its own tests below."""
    emb = Embedder(fast, progress=False, runtime=runtime, query_int8=False)
    got = np.stack([emb.embed_query(c) for c in captions])
    assert emb.query_graph() is not None
    path = emb.fp32_query_path(concepts=True)
    with torch.no_grad():
        want = np.concatenate(
            [
                path(t["input_ids"], t["attention_mask"]).numpy()
                for t in (emb.extractor.text_backbone.tokenize([c]) for c in captions)
            ]
        )
    assert got.shape == (len(captions), emb.dim)
    assert _cos(got, want).min() >= COS_MIN[R.precision(runtime)]
    # a padded batch of queries gives each query's own answer
    batch = emb.embed_texts(captions[:16], cached=False)
    assert _cos(batch, got[:16]).min() >= 0.9999
    # the concept switch changes the output: its own graph, not the cached one
    emb.model.use_concepts = False
    off = emb.embed_query(captions[0])
    assert off.shape == (fast.config.embed_dim,)
    emb.model.use_concepts = True
    # a second embedder reuses the export on disk
    monkeypatch.setattr(R.CompiledGraph, "_export", lambda *a: pytest.fail("exported again"))
    again = Embedder(fast, progress=False, runtime=runtime, query_int8=False)
    assert np.allclose(again.embed_query(captions[0]), got[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["fast", "deformer"])
@pytest.mark.parametrize("runtime", GRAPH_RUNTIMES)
def test_query_graph_takes_long_queries_whole(runtime, kind, fast, captions):
    """The export example is a short caption: a query longer than it must not be cut to its length
    (the decomposed deformer's graph did that until GRAPH_VERSION 2)."""
    from vlsearch.models.deformer import DeformerConfig, DeformerModel

    model = fast
    if kind == "deformer":
        torch.manual_seed(0)
        config = DeformerConfig(n_layers=2, image_grid=2, embed_dim=256).aligned_with_fast(fast.config)
        model = DeformerModel(config).eval()
        model.init_from_fast(fast)
        model.set_mode("decomposed")
    long = " ".join(sorted(captions, key=len)[-3:])  # ~40 words, past every fixed query length
    queries = [captions[0], long]
    emb = Embedder(model, progress=False, runtime=runtime, query_int8=False)
    got = np.stack([emb.embed_query(q) for q in queries])
    path = emb.fp32_query_path(concepts=bool(model.concepts_active))  # the graph's fp32 source
    with torch.no_grad():
        want = np.concatenate(
            [
                path(t["input_ids"], t["attention_mask"]).numpy()
                for t in (emb.extractor.text_backbone.tokenize([q]) for q in queries)
            ]
        )
    assert emb.query_graph() is not None and got.shape == want.shape
    assert _cos(got, want).min() >= COS_MIN[R.precision(runtime)]


@pytest.mark.parametrize("runtime", GRAPH_RUNTIMES)
def test_graph_is_safe_across_threads(runtime, fast, captions):
    emb = Embedder(fast, progress=False, runtime=runtime)
    want = {c: emb.embed_query(c) for c in captions[:12]}
    errors, got = [], {}

    def worker(part):
        try:
            for _ in range(3):
                for c in part:
                    got[(c, threading.get_ident())] = emb.embed_query(c)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(captions[i::3][:4],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (c, _), v in got.items():
        assert np.array_equal(v, want[c])


@pytest.mark.parametrize("runtime", GRAPH_RUNTIMES)
def test_falls_back_to_pytorch_when_export_fails(runtime, fast, captions, photos, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("operator not supported")

    monkeypatch.setattr(torch.onnx, "export", broken)
    monkeypatch.setattr(R, "runtime_dir", lambda: R.home() / "runtime-empty")  # nothing cached to reuse
    emb = Embedder(fast, progress=False, runtime=runtime)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = emb.embed_query(captions[0])
    assert any("falling back to PyTorch" in str(w.message) for w in caught)
    torch_emb = Embedder(fast, progress=False, runtime="torch").embed_query(captions[0])
    assert np.array_equal(got, torch_emb)
    backbone = ImageBackbone(ImageBackboneConfig(runtime=runtime))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = backbone.encode_numpy(photos[:2])
    assert backbone.runtime == "torch" and out["grid"].shape == (2, 49, 1280)


@pytest.mark.parametrize("runtime", GRAPH_RUNTIMES)
def test_damaged_cached_export_is_made_again(runtime, photos):
    backbone = ImageBackbone(ImageBackboneConfig(runtime=runtime))
    want = backbone.encode_numpy(photos[:2])["grid"]
    path = backbone.compiled().path
    path.write_bytes(b"not an onnx file")
    again = ImageBackbone(ImageBackboneConfig(runtime=runtime))
    got = again.encode_numpy(photos[:2])["grid"]
    assert again.runtime == runtime and np.allclose(got, want, atol=1e-5)
    assert path.stat().st_size > 1_000_000


@pytest.mark.parametrize(
    "text",
    [
        "a dog",
        "",
        "   ",
        "A man in a red shirt climbs a rock wall while his friend belays him from below",
        " ".join(["word"] * 80),  # past max_tokens: truncated, then [SEP]
        "naïve café: 東京の犬 🐕 — “quoted”, e-mail@example.com, 3.14, C++",
        "x" * 500,  # one long word: many word pieces
    ],
)
def test_tokenize_one_matches_the_batch_tokenizer(text):
    """The single-query fast path (the Rust tokenizer, its own truncation) gives exactly the ids and mask
    of ``tokenize([text])``, including past the token limit."""
    from vlsearch.encoders.text import TextBackbone, TextBackboneConfig

    backbone = TextBackbone(TextBackboneConfig())
    ids, mask = backbone.tokenize_one(text)
    want = backbone.tokenize([text], "np")
    assert ids.dtype == np.int64 and ids.shape == mask.shape
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])


def test_query_int8_choice(monkeypatch):
    """int8 queries run on ONNX Runtime only, by default where the CPU has no native bf16."""
    from vlsearch.precision import use_bf16

    monkeypatch.delenv("VLSEARCH_QUERY_INT8", raising=False)
    assert R.query_int8("onnxruntime") == (not use_bf16())
    assert not R.query_int8("openvino") and not R.query_int8("torch")
    monkeypatch.setenv("VLSEARCH_QUERY_INT8", "0")
    assert not R.query_int8("onnxruntime")
    monkeypatch.setenv("VLSEARCH_QUERY_INT8", "1")
    assert R.query_int8("onnxruntime") and not R.query_int8("openvino")
    monkeypatch.setenv("VLSEARCH_QUERY_INT8", "yes")
    with pytest.raises(VLSearchError, match="VLSEARCH_QUERY_INT8"):
        R.query_int8("onnxruntime")


@pytest.mark.skipif("onnxruntime" not in GRAPH_RUNTIMES, reason="onnxruntime not installed")
def test_int8_query_graph_ranks_like_fp32(fast, captions, monkeypatch):
    """The int8 query graph runs int8 matmuls, stays near fp32, and ranks real captions against each other
    as fp32 does: each caption's nearest other caption mostly agrees."""
    import onnx

    monkeypatch.setenv("VLSEARCH_QUERY_INT8", "1")
    emb = Embedder(fast, progress=False, runtime="onnxruntime")
    got = np.stack([emb.embed_query(c) for c in captions])
    graph = emb.query_graph()
    monkeypatch.setenv("VLSEARCH_QUERY_INT8", "0")
    fp32 = Embedder(fast, progress=False, runtime="onnxruntime")
    want = np.stack([fp32.embed_query(c) for c in captions])
    assert graph.precision == "int8" and fp32.query_graph().precision == "fp32"
    ops = [n.op_type for n in onnx.load(str(graph.path)).graph.node]
    # every weight matmul is int8; what stays fp32 is attention's two activation x activation products
    assert "DynamicQuantizeLinear" in ops and ops.count("MatMulInteger") >= 24  # 6 layers x 4 linears
    assert _cos(got, want).min() >= COS_MIN["int8"]

    def nearest(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    assert (nearest(got) == nearest(want)).mean() >= 0.8


@pytest.mark.skipif("onnxruntime" not in GRAPH_RUNTIMES, reason="onnxruntime not installed")
def test_int8_query_graph_that_drifts_falls_back_to_fp32(fast, captions, monkeypatch):
    """A fresh int8 export further from fp32 than INT8_MIN_COS on the probes is deleted, and fp32 runs."""
    import vlsearch.models.embedder as E

    monkeypatch.setenv("VLSEARCH_QUERY_INT8", "1")
    monkeypatch.setattr(E, "INT8_MIN_COS", 1.01)  # nothing passes
    monkeypatch.setattr(
        R, "runtime_dir", lambda: R.home() / "runtime-own"
    )  # a fresh export, not the shared one
    emb = Embedder(fast, progress=False, runtime="onnxruntime")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = emb.query_graph()
    assert any("int8 text queries" in str(w.message) for w in caught)
    assert graph.precision == "fp32" and not list(R.runtime_dir().glob("query-*-int8.onnx"))
    path = emb.fp32_query_path(concepts=True)
    t = emb.extractor.text_backbone.tokenize([captions[0]])
    with torch.no_grad():
        want = path(t["input_ids"], t["attention_mask"]).numpy()
    assert _cos(emb.embed_query(captions[0])[None], want).min() >= COS_MIN["fp32"]

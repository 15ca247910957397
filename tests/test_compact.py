"""Compact re-ranking features (encoders/compact.py, models/compact.py): int8 parts within 48 KB per
image, a round trip that keeps the Slow model's scores, a re-ranker that reads the compact store (and
fills it once), and a store that another checkpoint's parts never collide with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsearch.encoders.compact import part_bytes, quantize, round_trip


def test_quantization_is_per_token_and_within_half_a_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 196, 112)).astype(np.float32) * np.array([1e-3, 1.0, 50.0])[:, None, None]
    codes, scale = quantize(x)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 196, 1)
    assert np.all(np.abs(round_trip(x) - x) <= 0.5 * scale.astype(np.float32) + 1e-7)
    assert np.all(np.abs(codes).max(axis=-1) == 127)  # each token's largest value uses the full range
    zeros = round_trip(np.zeros((2, 5, 8), np.float32))  # an all-zero token: no division by zero
    assert np.all(zeros == 0)


def _slow(seed=0, prior=True):
    from vlsearch.models.fast import FastConfig
    from vlsearch.models.slow import SlowConfig, SlowModel

    torch.manual_seed(seed)
    cfg = SlowConfig(n_layers=1, fusion_weight=1.0, fast_prior=vars(FastConfig()) if prior else None)
    return SlowModel(cfg, init_from_pretrained=False).eval()


def test_slow_parts_fit_in_48_kb_and_rebuild_its_image_state():
    """Exact parts give exactly the image state of the full maps; int8 parts give scores that keep
    the order of 32 candidates (Spearman >= 0.99) and the same best one."""
    from vlsearch.models.compact import CompactScorer

    model = _slow()
    assert part_bytes(model.compact_shapes()) <= 48 * 1024
    rng = np.random.default_rng(1)
    grid = torch.from_numpy(np.maximum(rng.standard_normal((32, 49, 1280)), 0).astype(np.float32))
    mid = torch.from_numpy(rng.standard_normal((32, 196, 112)).astype(np.float32))
    states = torch.from_numpy(rng.standard_normal((1, 9, 384)).astype(np.float32))
    text = model.text_state(states, torch.tensor([9]))
    with torch.no_grad():
        full = model.score(text, model.image_state(grid, mid))[0]
        exact = model.score(text, model.image_state_from_parts(model.compact_parts(grid, mid)))[0]
        small = CompactScorer(model).score(text, CompactScorer(model).image_state(grid, mid))[0]
    assert torch.allclose(full, exact, atol=1e-5)
    rank = lambda v: np.argsort(np.argsort(v.numpy()))  # noqa: E731
    assert np.corrcoef(rank(full), rank(small))[0, 1] >= 0.99
    assert int(full.argmax()) == int(small.argmax())


def test_digest_names_the_weights_that_make_the_parts():
    assert _slow(0).compact_digest() == _slow(0).compact_digest()
    assert _slow(0).compact_digest() != _slow(1).compact_digest()
    assert _slow(0).compact_digest() != _slow(0, prior=False).compact_digest()


def test_compact_scorer_refuses_a_model_without_parts():
    from vlsearch.errors import CheckpointError
    from vlsearch.models.compact import CompactScorer
    from vlsearch.models.fast import FastConfig, FastModel

    with pytest.raises(CheckpointError, match="cannot read compact features"):
        CompactScorer(FastModel(FastConfig(), init_from_pretrained=False))


def test_reranker_reads_the_compact_store(mini_flickr):
    """On real photos' cached features: the compact re-ranker fills its store once (under 48 KB per
    image on disk), then reads it, and ranks the candidates as the full maps do."""
    from vlsearch.data import load_dataset
    from vlsearch.encoders.features import FeatureExtractor
    from vlsearch.search.rerank import Reranker

    fx = FeatureExtractor(progress=False)
    keys = [k for k in fx.image_keys(load_dataset(mini_flickr, "dev").image_paths[:16]).keys if k]
    model = _slow()
    full = Reranker(model, extractor=fx)
    small = Reranker(model, extractor=fx, compact=True)
    zeros = np.zeros(len(keys), np.float32)
    _, want, _ = full.rerank_text("a dog runs on the grass", keys, zeros)
    _, got, _ = small.rerank_text("a dog runs on the grass", keys, zeros)
    store = small.compact_store()
    assert store.missing(keys) == [] and 0 < store.bytes_per_item() <= 48 * 1024
    assert small.fill_compact(keys) == 0  # already there: nothing encoded again
    assert store.root.parent == fx.images.root and model.compact_digest() in store.root.name
    assert np.corrcoef(want, got)[0, 1] > 0.99, (want, got)
    assert int(np.argmax(want)) == int(np.argmax(got))
    small.forget()
    _, again, _ = small.rerank_text("a dog runs on the grass", keys, zeros)  # from the store this time
    assert np.allclose(again, got, atol=1e-5)

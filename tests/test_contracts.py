"""The model contracts (vlsearch.models.contracts): which models are dual encoders and pair scorers, and
what a conforming model must do, checked on real model classes."""

from __future__ import annotations

import pytest
import torch

from tests.test_deformer import fake_inputs as inputs
from vlsearch.models.contracts import DualEncoder, PairScorer, States, is_dual_encoder, is_pair_scorer
from vlsearch.models.deformer import DeformerConfig, DeformerModel
from vlsearch.models.fast import FastConfig, FastModel, has_prior_column
from vlsearch.models.slow import SlowConfig, SlowModel


def deformer(mode: str) -> DeformerModel:
    torch.manual_seed(0)
    return DeformerModel(
        DeformerConfig(n_layers=1, image_grid=2, embed_dim=32, use_mid=True, mode=mode),
        init_from_pretrained=False,
    ).eval()


def check_dual_encoder(model, grid, mid, states, lengths) -> None:
    """Unit vectors of width embed_dim (before the hubness prior's column, where the model has one: 1 for
    a text); each image and text embedded independently of its batch."""
    assert isinstance(model, DualEncoder) and is_dual_encoder(model) and not is_pair_scorer(model)
    with torch.no_grad():
        img, txt = model.encode_image(grid, mid), model.encode_text(states, lengths)
        assert img.shape == (len(grid), model.embed_dim) and txt.shape == (len(states), model.embed_dim)
        body = slice(None, -1 if has_prior_column(model) else None)
        if has_prior_column(model):
            assert torch.all(txt[:, -1] == 1)
        assert torch.allclose(img[:, body].norm(dim=-1), torch.ones(len(img)), atol=1e-4)
        assert torch.allclose(txt[:, body].norm(dim=-1), torch.ones(len(txt)), atol=1e-4)
        assert torch.allclose(model.encode_image(grid[1:2], mid[1:2]), img[1:2], atol=1e-4)
        assert torch.allclose(model.encode_text(states[2:3], lengths[2:3]), txt[2:3], atol=1e-4)


def test_fast_is_a_dual_encoder():
    torch.manual_seed(0)
    check_dual_encoder(FastModel(FastConfig(), init_from_pretrained=False).eval(), *inputs())


def test_trained_fast_with_its_concept_channel_is_a_dual_encoder(tiny_fast_checkpoint):
    """The conftest Fast model (the recipe fast-distilled shares), concept channel on: embed_dim grows."""
    from vlsearch.models.fast import set_concepts
    from vlsearch.models.registry import load_model

    net = load_model(tiny_fast_checkpoint)[0].eval()
    column = int(has_prior_column(net))  # the hubness prior, when dev chose it (models/hubness.py)
    assert set_concepts(net, True) and net.embed_dim == net.config.embed_dim + net.config.text_dim + column
    check_dual_encoder(net, *inputs())
    set_concepts(net, False)
    assert net.embed_dim == net.config.embed_dim + column
    check_dual_encoder(net, *inputs())


def test_decomposed_deformer_is_a_dual_encoder_and_joint_is_not():
    check_dual_encoder(deformer("decomposed"), *inputs())
    joint = deformer("joint")
    assert joint.is_pair_scorer and not is_dual_encoder(joint)


def check_pair_scorer(model, grid, mid, states, lengths) -> None:
    """image_state once per image, text_state once per text, score for the block: the block equals
    each pair scored alone, and does not depend on which other images share the block. States select
    rows and stack back (what the re-ranker's per-image cache and length-sorted text chunks rely on)."""
    assert isinstance(model, PairScorer) and is_pair_scorer(model)
    assert hasattr(model.config, "fusion_weight") and hasattr(model.config, "fusion_weight_i2t")
    with torch.no_grad():
        text, image = model.text_state(states, lengths), model.image_state(grid, mid)
        assert isinstance(text, States) and isinstance(image, States)
        assert len(text) == len(states) and len(image) == len(grid)
        block = model.score(text, image).float()
        assert block.shape == (len(states), len(grid)) and torch.isfinite(block).all()
        for t in range(len(states)):
            one_text = model.text_state(states[t : t + 1], lengths[t : t + 1])
            for n in range(len(grid)):
                one = model.score(one_text, model.image_state(grid[n : n + 1], mid[n : n + 1])).float()
                assert torch.allclose(one[0, 0], block[t, n], atol=1e-3), (t, n)
        rows = torch.tensor([2, 0])
        picked = model.score(text.rows(rows), image.rows(slice(1, 3))).float()
        assert torch.allclose(picked, block[rows][:, 1:3], atol=1e-3)
        # texts computed apart at their own lengths, stacked: padding changes nothing
        parts = [
            model.text_state(states[i : i + 1, : int(lengths[i])], lengths[i : i + 1])
            for i in range(len(states))
        ]
        images = [image.rows(slice(i, i + 1)) for i in range(len(image))]
        joined = model.score(type(parts[0]).stack(parts), type(images[0]).stack(images)).float()
        assert torch.allclose(joined, block, atol=1e-3)


def test_slow_is_a_pair_scorer():
    torch.manual_seed(0)
    check_pair_scorer(SlowModel(SlowConfig(n_layers=1), init_from_pretrained=False).eval(), *inputs())


def test_joint_deformer_is_a_pair_scorer():
    check_pair_scorer(deformer("joint"), *inputs())


def test_the_pair_scorer_check_passes_a_conforming_model_and_fails_a_broken_one():
    """The conformance check itself can fail: a scorer whose block mixes up texts is caught."""

    class Rows:
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def rows(self, idx):
            return Rows(self.x[idx])

        @classmethod
        def stack(cls, parts):
            return cls(torch.cat([p.x for p in parts]))

    class Dot:
        is_pair_scorer = True
        config = type("Config", (), {"fusion_weight": 1.0, "fusion_weight_i2t": 1.0})()

        def image_state(self, grid, mid=None):
            return Rows(grid.mean(1)[:, :8])

        def text_state(self, states, lengths):
            mask = (torch.arange(states.shape[1])[None] < lengths[:, None]).float()[..., None]
            return Rows((states * mask).sum(1)[:, :8])

        def score(self, text_state, image_state):
            return text_state.x @ image_state.x.T

    class Shuffled(Dot):
        def score(self, text_state, image_state):
            return (text_state.x @ image_state.x.T).flip(0)

    check_pair_scorer(Dot(), *inputs())
    with pytest.raises(AssertionError):
        check_pair_scorer(Shuffled(), *inputs())


def test_scores_are_those_of_the_code_before_the_one_reranker_change(monkeypatch):
    """Both pair scorers' offline paths (all pairs, pairs grouped by image), seeded models on seeded
    inputs, against the scores the code before issue 14's Reranker change gave (tests/data, made with
    its own score_all_pairs / score_pairs_grouped). On the machine that made them the Slow scores are
    bit-identical and deformer-joint's within 3e-6 (its pairs are now batched per image); the tolerance
    leaves room for another CPU's matmul kernels. scripts/scoring_regression.py does the same on real
    features with a trained Fast prior, bit for bit. In fp32, as the golden scores were made (a bf16 CPU
    would otherwise run them under bf16 autocast)."""
    import types
    from pathlib import Path

    import numpy as np

    from vlsearch.search.pair_scoring import score_all_pairs, score_pairs_grouped

    monkeypatch.setenv("VLSEARCH_PRECISION", "fp32")
    want = np.load(Path(__file__).parent / "data" / "pair_scores_before_issue14.npz")
    g = torch.Generator().manual_seed(0)
    states = torch.randn(7, 11, 384, generator=g)
    lengths = torch.tensor([11, 4, 9, 2, 7, 11, 5])
    mid = torch.randn(6, 196, 112, generator=g)
    grid = torch.randn(6, 49, 1280, generator=g)
    feats = types.SimpleNamespace(states=states, lengths=lengths, mid=mid, grid=grid, n_images=6)
    ti = np.array([0, 1, 2, 3, 4, 5, 6, 0, 3, 6])
    ii = np.array([0, 1, 2, 3, 4, 5, 0, 5, 5, 2])
    torch.manual_seed(0)
    slow = SlowModel(SlowConfig(n_layers=2), init_from_pretrained=False).eval()
    torch.nn.init.normal_(slow.head[-1].weight, std=0.5)
    torch.manual_seed(0)
    joint = DeformerModel(
        DeformerConfig(n_layers=1, image_grid=2, embed_dim=32, use_mid=True), init_from_pretrained=False
    ).eval()
    for name, model in (("slow", slow), ("joint", joint)):
        got_all = score_all_pairs(model, feats, progress=False)
        got_pairs = score_pairs_grouped(model, states, lengths, grid, mid, ti, ii)
        assert got_all.std() > 0.01 and np.allclose(got_all[ti, ii], got_pairs, atol=1e-4)
        assert np.allclose(got_all, want[f"{name}_all"], rtol=1e-5, atol=1e-5), name
        assert np.allclose(got_pairs, want[f"{name}_pairs"], rtol=1e-5, atol=1e-5), name

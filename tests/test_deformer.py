"""VLDeformer: one set of weights, a joint pair scorer and a decomposed dual encoder."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vlsearch.cli import main
from vlsearch.errors import CheckpointError, QueryError
from vlsearch.models.deformer import DeformerConfig, DeformerModel
from vlsearch.models.fast import set_hubness
from vlsearch.precision import autocast
from vlsearch.training.common import TrainRequest


def tiny_config(**kw) -> DeformerConfig:
    base = dict(n_layers=1, image_grid=2, embed_dim=32)
    base.update(kw)
    return DeformerConfig(**base)


def fake_inputs(n_images=3, n_texts=4, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(n_images, 49, 1280, generator=g).abs()
    mid = torch.randn(n_images, 196, 112, generator=g).abs()
    states = torch.randn(n_texts, L, 384, generator=g)
    lengths = torch.randint(3, L + 1, (n_texts,), generator=g)
    lengths[0] = L
    return grid, mid, states, lengths


def test_modes_share_every_parameter():
    torch.manual_seed(0)
    model = DeformerModel(tiny_config(use_mid=True), init_from_pretrained=False)
    assert model.is_pair_scorer
    grid, mid, states, lengths = fake_inputs()
    # the transformer parameters the joint score reads are the very tensors the two encoders read
    layer_params = {n: p for n, p in model.named_parameters() if n.startswith("layers.")}

    def touched(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n for n, p in layer_params.items() if p.grad is not None and p.grad.abs().sum() > 0}

    joint = touched(model.score_pairs(grid[:3], mid[:3], states[:3], lengths[:3]).sum())
    image = touched(model.encode_image(grid, mid).sum())
    text = touched(model.encode_text(states, lengths).sum())
    assert joint and joint == image | text
    assert image == text  # both encoders run the same layers
    # switching mode changes no weight: the decomposed model IS the joint model's parameters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_mode("decomposed")
    assert not model.is_pair_scorer
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # and a change to a shared layer moves both the joint score and the decomposed embeddings
    with torch.no_grad():
        e_img, e_txt = model.encode_image(grid, mid), model.encode_text(states, lengths)
        s = model.score_pairs(grid[:3], mid[:3], states[:3], lengths[:3])
        model.layers[0].ffn_in.weight.mul_(1.5)
        assert not torch.allclose(e_img, model.encode_image(grid, mid))
        assert not torch.allclose(e_txt, model.encode_text(states, lengths))
        assert not torch.allclose(s, model.score_pairs(grid[:3], mid[:3], states[:3], lengths[:3]))


def test_closed_gates_make_the_joint_score_its_own_decomposition():
    torch.manual_seed(0)
    model = DeformerModel(tiny_config(n_layers=2), init_from_pretrained=False).eval()
    grid, mid, states, lengths = fake_inputs(n_images=4, n_texts=4)
    with torch.no_grad():
        # with the cross-modal gates at 0 (their init) and no ITM MLP term (init: ~0) the joint score is
        # exactly the scaled cosine of the separately run streams
        model.itm_head[-1].weight.zero_()
        joint = model.score_pairs(grid, None, states, lengths)
        dual = model.scale * (model.encode_image(grid) * model.encode_text(states, lengths)).sum(-1)
        assert torch.allclose(joint, dual, atol=1e-4)
        # opening a gate lets image and text interact: the joint score moves, the encoders do not
        model.cross_gate.fill_(1.0)
        assert not torch.allclose(model.score_pairs(grid, None, states, lengths), dual, atol=1e-3)
        again = model.scale * (model.encode_image(grid) * model.encode_text(states, lengths)).sum(-1)
        assert torch.allclose(again, dual)


def test_warm_start_from_fast_is_exactly_that_fast_model():
    from vlsearch.models.fast import FastConfig, FastModel

    torch.manual_seed(0)
    fast = FastModel(FastConfig(embed_dim=32), init_from_pretrained=False).eval()
    model = DeformerModel(tiny_config(n_layers=2), init_from_pretrained=False).eval()
    model.init_from_fast(fast)
    with torch.no_grad():
        model.itm_head[-1].weight.zero_()  # (the ITM MLP term starts ~0, not 0)
    grid, mid, states, lengths = fake_inputs(n_images=4, n_texts=4)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(grid), fast.encode_image(grid), atol=1e-5)
        assert torch.allclose(
            model.encode_text(states, lengths), fast.encode_text(states, lengths), atol=1e-5
        )
        joint = model.score_pairs(grid, None, states, lengths)
        ref = fast.scale * (fast.encode_image(grid) * fast.encode_text(states, lengths)).sum(-1)
        assert torch.allclose(joint, ref, atol=1e-3)
    with pytest.raises(CheckpointError, match="does not match"):
        DeformerModel(tiny_config(n_layers=1), init_from_pretrained=False).init_from_fast(fast)


def test_warm_start_from_a_concept_fast_model_carries_its_concept_channel(tmp_path):
    """Fast's fused score (stream cosine + w x concept cosine) is what both modes start from."""
    from vlsearch.models.checkpoint import save_checkpoint
    from vlsearch.models.fast import FastConfig, FastModel, set_concepts
    from vlsearch.models.registry import load_model

    torch.manual_seed(0)
    fast = FastModel(FastConfig(embed_dim=32, concepts=True, concept_weight=0.3), False).eval()
    with torch.no_grad():  # (an untrained channel is all zeros: give it a head and label embeddings)
        fast.concept.head_weight.normal_(std=0.05)
        fast.concept.labels.copy_(
            torch.nn.functional.normalize(torch.randn_like(fast.concept.labels), dim=-1)
        )
    config = tiny_config(n_layers=2).aligned_with_fast(fast.config)
    assert config.concepts and config.concept_weight == 0.3
    model = DeformerModel(config, init_from_pretrained=False).eval()
    model.init_from_fast(fast)
    with torch.no_grad():
        model.itm_head[-1].weight.zero_()
    grid, mid, states, lengths = fake_inputs(n_images=4, n_texts=4)
    with torch.no_grad():
        assert model.embed_dim == fast.embed_dim == 32 + 384
        e_img, e_txt = model.encode_image(grid), model.encode_text(states, lengths)
        assert torch.allclose(e_img, fast.encode_image(grid), atol=1e-5)
        assert torch.allclose(e_txt, fast.encode_text(states, lengths), atol=1e-5)
        joint = model.score_pairs(grid, None, states, lengths)
        assert torch.allclose(joint, fast.scale * (e_img * e_txt).sum(-1), atol=1e-3)
        # the pair-scorer contract fuses the same concept score
        grid_scores = model.score(model.text_state(states, lengths), model.image_state(grid))
        assert torch.allclose(grid_scores.diagonal(), joint, atol=1e-3)
        set_concepts(model, False)  # switched off: the streams alone, as Fast's
        assert model.encode_image(grid).shape[1] == 32
        set_concepts(model, True)
    model.requires_grad_(True)
    assert not any(p.requires_grad for p in model.concept.parameters())  # frozen, whatever trains
    save_checkpoint(tmp_path / "dec", model, {})
    again = load_model(tmp_path / "dec")[0].eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_text(states, lengths), e_txt, atol=1e-6)
    with pytest.raises(CheckpointError, match="concept channel"):
        DeformerModel(tiny_config(n_layers=2, embed_dim=32), False).init_from_fast(fast)


def test_decomposition_fine_tunes_the_joint_weights():
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.training.decompose import DecomposeTrainConfig, subset_features, train_decomposed

    torch.manual_seed(0)
    joint = DeformerModel(tiny_config(), init_from_pretrained=False)
    grid, mid, states, lengths = fake_inputs(n_images=12, n_texts=24)
    feats = DatasetFeatures(
        None, grid.half(), None, states.half(), lengths, lengths[:, None], torch.arange(24) % 12
    )
    target = subset_features(feats, 0.5, seed=0)
    assert target.n_images == 6 and len(target.states) == 12
    tc = DecomposeTrainConfig(
        epochs=2,
        batch_size=6,
        group=2,
        warmup_steps=1,
        minutes=1,
        distill_weight=1.0,
        distill_queries=3,
        distill_list=3,
    )
    dec, hist = train_decomposed(joint, target, tc, progress=False)
    assert hist["steps"] >= 1 and np.isfinite(hist["loss"]).all()
    assert dec.config.mode == "decomposed" and joint.config.mode == "joint"
    assert dec.state_dict().keys() == joint.state_dict().keys()
    changed = [k for k, v in dec.state_dict().items() if not torch.equal(v, joint.state_dict()[k])]
    assert any(k.startswith("layers.") for k in changed)
    # with a dev set, the decomposition keeps its best dev state (epoch 0 = the joint model's own streams)
    from vlsearch.training.deformer import decomposed_metrics

    dec, hist = train_decomposed(joint, target, tc, dev=target, progress=False, log=lambda *a: None)
    best = max(hist["dev"], key=lambda d: d["mean_recall"])
    assert hist["best_epoch"] == best["epoch"]
    assert decomposed_metrics(dec, target)["mean_recall"] == pytest.approx(best["mean_recall"], abs=0.01)


def test_joint_score_is_invariant_to_padding():
    torch.manual_seed(0)
    model = DeformerModel(tiny_config(use_mid=True), init_from_pretrained=False).eval()
    with torch.no_grad():
        model.cross_gate.fill_(0.5)
        model.itm_head[-1].weight.normal_()
    grid, mid, states, lengths = fake_inputs(n_images=4, n_texts=4, L=8)
    padded = torch.cat([states, 100 * torch.randn(4, 12, 384)], 1)  # garbage beyond each length
    states = torch.where(torch.arange(8)[None, :, None] < lengths[:, None, None], states, 0.0)
    with torch.no_grad():
        a = model.score_pairs(grid, mid, states, lengths)
        b = model.score_pairs(grid, mid, padded, lengths)
        # garbage in the padded positions of the short captions too
        noisy = states.clone()
        noisy[lengths < 8] += 50 * (torch.arange(8)[None, :, None] >= lengths[lengths < 8][:, None, None])
        c = model.score_pairs(grid, mid, noisy, lengths)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    # each caption alone (no padding at all) scores the same as in the padded batch
    for i in range(4):
        L = int(lengths[i])
        alone = model.score_pairs(grid[i : i + 1], mid[i : i + 1], states[i : i + 1, :L], lengths[i : i + 1])
        assert torch.allclose(alone, a[i : i + 1], atol=1e-5)
    # the all-pairs entry point (bf16) agrees with aligned pairs, and pair lists index into it
    full = model.score_texts_images(padded, lengths, grid, mid)
    assert full.shape == (4, 4)
    assert torch.allclose(full.diagonal(), a, atol=0.1 * a.abs().max() + 0.1)
    ti, ii = torch.tensor([0, 3, 2]), torch.tensor([1, 1, 0])
    assert torch.allclose(
        model.score_texts_images(padded, lengths, grid, mid, ti, ii), full[ti, ii], atol=1e-4
    )


def test_checkpoint_round_trip(tmp_path):
    from vlsearch.errors import CheckpointError
    from vlsearch.models.checkpoint import load_checkpoint, save_checkpoint
    from vlsearch.models.registry import load_model

    torch.manual_seed(0)
    model = DeformerModel(tiny_config(use_mid=True), init_from_pretrained=False).eval()
    grid, mid, states, lengths = fake_inputs()
    path = save_checkpoint(tmp_path / "joint", model, {"note": "test"})
    again, meta = load_model(path)[:2]
    assert isinstance(again, DeformerModel) and again.is_pair_scorer and meta["note"] == "test"
    with torch.no_grad():
        assert torch.equal(
            model.score_pairs(grid, mid, states[:3], lengths[:3]),
            again.score_pairs(grid, mid, states[:3], lengths[:3]),
        )
    model.set_mode("decomposed")
    dec, _ = load_checkpoint(save_checkpoint(tmp_path / "dec", model), DeformerModel)
    assert dec.config.mode == "decomposed" and not dec.is_pair_scorer and dec.config.embed_dim == 32
    with torch.no_grad():
        assert torch.equal(model.encode_image(grid, mid), dec.encode_image(grid, mid))
        assert torch.equal(model.encode_text(states, lengths), dec.encode_text(states, lengths))
    cfg = json.loads((tmp_path / "dec" / "config.json").read_text())
    cfg["config"]["mode"] = "sideways"
    (tmp_path / "dec" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "dec")


def test_cost_helper_on_synthetic_gallery():
    from vlsearch.bench.deformer import joint_vs_decomposed_cost

    torch.manual_seed(0)
    model = DeformerModel(tiny_config(), init_from_pretrained=False)
    dec = DeformerModel(tiny_config(mode="decomposed"), init_from_pretrained=False)
    grid, mid, states, lengths = fake_inputs(n_images=20, n_texts=2)
    rows = joint_vs_decomposed_cost(
        model, dec, grid, None, states, lengths, gallery_sizes=(20, 200), joint_measured=20, batch=8
    )
    assert [r["gallery"] for r in rows] == [20, 200]
    assert not rows[0]["joint_extrapolated"] and rows[1]["joint_extrapolated"]
    assert rows[1]["joint_ms_per_query"] == pytest.approx(10 * rows[0]["joint_ms_per_query"])
    assert all(r["speedup"] > 0 and r["speedup_batched"] > 0 for r in rows)


@pytest.fixture(scope="module")
def tiny_deformers(tiny_fast_checkpoint, mini_flickr, tmp_path_factory, slow_checkpoint):
    """A deformer-joint (with its default teacher, the named Slow model) and its decomposition (with the
    joint model's distillation term), trained for a few steps on the mini split (checkpoint paths)."""
    from vlsearch.training import decompose
    from vlsearch.training import deformer as training

    out = tmp_path_factory.mktemp("deformers")
    req = TrainRequest(data_root=str(mini_flickr), epochs=2, out=str(out / "joint"), quiet=True)
    small = DeformerConfig(n_layers=1, image_grid=2, embed_dim=64)
    joint = training.train_joint_and_save(
        req,
        extra={
            "batch_size": 16,
            "itm_queries": 4,
            "itm_hard": 2,
            "mine_k": 5,
            "warmup_steps": 1,
            "fast_model": "fast",
        },
        config=small,
    )
    assert json.loads((joint / "config.json").read_text())["teacher"] == str(slow_checkpoint)
    req = replace(req, out=str(out / "dec"), subset=0.5, distill_weight=1.0, joint=str(joint))
    dec = decompose.train_decomposed_and_save(req, extra={"batch_size": 8, "group": 2, "warmup_steps": 1})
    meta = json.loads((dec / "config.json").read_text())
    assert meta["joint"] == str(joint) and meta["train"]["distill_weight"] == 1.0
    return joint, dec


def test_tiny_decomposed_model_plugs_into_index_and_search(
    tiny_deformers, tiny_fast_checkpoint, mini_flickr, tmp_path, capsys
):
    import vlsearch
    from vlsearch.index.build import build_index
    from vlsearch.index.gallery import GalleryIndex

    joint, dec = tiny_deformers
    out = tmp_path / "idx"
    build_index(out, mini_flickr, "dev", model=str(dec), progress=False)
    idx = GalleryIndex.open(out)
    # the warm start from the Fast model fixes the embedding size to the Fast model's (not the config's
    # 64), its concept space included, and the index records the channel as it does for Fast
    fast = json.loads((Path(tiny_fast_checkpoint) / "config.json").read_text())["config"]
    fast_dim = fast["embed_dim"] + (
        fast["text_dim"] if fast["concepts"] and fast["concept_weight"] > 0 else 0
    )
    assert idx.config.model_type == "deformer" and idx.config.dim == fast_dim and idx.config.n_images == 40
    assert idx.config.concepts == (fast_dim > fast["embed_dim"])
    engine = vlsearch.load(out)
    res = engine.search("a dog runs through the grass", k=5)
    assert len(res.hits) == 5 and res.hits[0].score >= res.hits[-1].score
    first = idx.record(0)
    assert engine.search_image(first.path, k=3).hits[0].row == 0
    assert main(["search", "a dog", "--index", str(out), "--model", str(dec), "--k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    # and `vlsearch eval` embeds it like the Fast model
    assert (
        main(["eval", "--data-root", str(mini_flickr), "--model", str(dec), "--images", "10", "--json"]) == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["n_images"] == 10 and "fast_encode_ms" in res["cost"]


def test_eval_joint_and_rerank(tiny_deformers, mini_flickr, capsys):
    pytest.importorskip("vlsearch.search.rerank")
    joint, dec = tiny_deformers
    assert (
        main(["eval", "--data-root", str(mini_flickr), "--model", str(joint), "--images", "8", "--json"]) == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["n_images"] == 8 and res["n_captions"] == 40 and res["cost"]["pairs_per_s"] > 0
    for d in ("t2i", "i2t"):
        assert 0 <= res[d]["r1"] <= res[d]["r5"] <= res[d]["r10"] <= 100
    # re-ranking each query's top 3 reorders only those 3: R@5 and R@10 stay the dual encoder's own
    argv = ["eval", "--data-root", str(mini_flickr), "--model", str(dec), "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--rerank", "3", "--rerank-model", str(joint)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rerank"] == 3 and res["n_images"] == plain["n_images"] == 40
    assert res["t2i"]["r5"] == plain["t2i"]["r5"] and res["t2i"]["r10"] == plain["t2i"]["r10"]


def test_joint_training_with_frozen_streams_keeps_the_fast_model(tiny_deformers, tiny_fast_checkpoint):
    """The joint model adds interaction on top of its warm start: run apart, it is still that Fast model."""
    from vlsearch.models.registry import load_model

    joint = load_model(tiny_deformers[0])[0].set_mode("decomposed").eval()
    fast = load_model(tiny_fast_checkpoint)[0].eval()  # its towers and its concept channel
    set_hubness(fast, False)  # the deformer has no hubness prior (models/hubness.py)
    grid, _, states, lengths = fake_inputs(n_images=4, n_texts=4)
    with torch.no_grad():
        assert torch.allclose(joint.encode_image(grid), fast.encode_image(grid), atol=1e-4)
        assert torch.allclose(
            joint.encode_text(states, lengths), fast.encode_text(states, lengths), atol=1e-4
        )
        assert torch.tanh(joint.cross_gate).abs().max() > 0  # while the interaction did train


def test_joint_training_on_out_of_fold_streams(tiny_fast_checkpoint, mini_flickr, tmp_path, monkeypatch):
    """With stream_folds, each step runs on the streams of a Fast model that never saw that step's images,
    every list stays inside one fold, and the saved model carries the full Fast model's streams."""
    from vlsearch.models.checkpoint import save_checkpoint
    from vlsearch.models.registry import load_model
    from vlsearch.models.slow import SlowConfig, SlowModel
    from vlsearch.settings import home
    from vlsearch.training import deformer as training
    from vlsearch.training.crossfit import fold_assignment

    loaded, lists = [], []
    real_load, real_teacher = training._load_streams, training.teacher_list_logits

    def recording_load(model, fast):
        loaded.append(fast)
        real_load(model, fast)

    def recording_teacher(model, teacher, train, t_rows, i_rows, q):
        assert teacher.prior is loaded[-1]  # the teacher's Fast prior is out of fold too: the same model
        lists.append(train.caption_image[t_rows].numpy().tolist() + i_rows.numpy().tolist())
        return real_teacher(model, teacher, train, t_rows, i_rows, q)

    # the teacher: a Slow model with the full Fast model as its prior, the named `slow` of this test
    fast = load_model(tiny_fast_checkpoint)[0].eval()
    set_hubness(fast, False)  # the deformer has no hubness prior (models/hubness.py)
    teacher = SlowModel(SlowConfig(n_layers=1, fast_prior=asdict(fast.config)), init_from_pretrained=False)
    teacher.set_prior(fast)
    save_checkpoint(home() / "models" / "slow", teacher, {"note": "prior only"})

    monkeypatch.setattr(training, "_load_streams", recording_load)
    monkeypatch.setattr(training, "teacher_list_logits", recording_teacher)
    req = TrainRequest(data_root=str(mini_flickr), epochs=2, out=str(tmp_path / "joint"), quiet=True)
    extra = {"batch_size": 8, "itm_queries": 4, "itm_hard": 2, "mine_k": 5, "warmup_steps": 1}
    path = training.train_joint_and_save(
        req,
        extra={**extra, "fast_model": "fast", "stream_folds": 2},
        config=DeformerConfig(n_layers=1, image_grid=2),
    )
    assert len({id(m) for m in loaded if m is not loaded[-1]}) == 2  # both fold models took turns
    assert loaded[-1].config == fast.config and loaded[-1] is not loaded[0]
    fold_of = fold_assignment(60, 2, seed=0)
    assert lists and all(len(set(fold_of[rows].tolist())) == 1 for rows in lists)
    joint = load_model(path)[0].set_mode("decomposed").eval()  # Fast's towers and concept channel
    grid, _, states, lengths = fake_inputs(n_images=4, n_texts=4)
    with torch.no_grad():
        assert torch.allclose(joint.encode_image(grid), fast.encode_image(grid), atol=1e-4)
        assert torch.allclose(
            joint.encode_text(states, lengths), fast.encode_text(states, lengths), atol=1e-4
        )
    assert json.loads((path / "config.json").read_text())["train"]["stream_folds"] == 2


def test_teacher_target_is_the_fused_rerank_score():
    """A Slow teacher's target over an ITM list is scale * (stream cosine + w * teacher score): with the
    fusion weight at 0 it is the model's own dual-encoder logits, and it moves with w by the teacher's
    scores, per direction."""
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.slow import SlowConfig, SlowModel
    from vlsearch.training.deformer import teacher_list_logits

    torch.manual_seed(0)
    model = DeformerModel(tiny_config(), init_from_pretrained=False)
    teacher = SlowModel(SlowConfig(n_layers=1, heads=4), init_from_pretrained=False).eval()
    grid, mid, states, lengths = fake_inputs(n_images=4, n_texts=4)
    feats = DatasetFeatures(None, grid.half(), mid.half(), states.half(), lengths, None, torch.arange(4))
    q = 2  # lists 0-1: caption -> 2 images; lists 2-3: image -> 2 captions
    t_rows = torch.tensor([0, 0, 1, 1, 2, 3, 3, 0])
    i_rows = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3])
    teacher.config.fusion_weight = teacher.config.fusion_weight_i2t = 0.0
    with torch.no_grad(), autocast():
        te = model.encode_text(feats.states, lengths).float()
        ie = model.encode_image(feats.grid.float()).float()
    own = model.scale.detach() * (te[t_rows] * ie[i_rows]).sum(-1)
    base = teacher_list_logits(model, teacher, feats, t_rows, i_rows, q)
    assert torch.allclose(base, own, atol=1e-4)
    teacher.config.fusion_weight, teacher.config.fusion_weight_i2t = 0.5, 0.0
    slow = teacher.score_texts_images(feats.states, lengths, feats.grid, feats.mid, t_rows, i_rows)
    moved = teacher_list_logits(model, teacher, feats, t_rows, i_rows, q)
    assert torch.allclose(moved[:4], own[:4] + model.scale.detach() * 0.5 * slow[:4], atol=1e-3)
    assert torch.allclose(moved[4:], own[4:], atol=1e-4)  # i2t lists keep their own weight (0)


def test_search_and_serve_rerank_with_deformer_joint(
    tiny_deformers, tiny_fast_checkpoint, mini_flickr, tmp_path, capsys
):
    """`--rerank-model deformer-joint` works like the Slow model's re-ranking, from the CLI and over HTTP,
    through the one Reranker; its pair scores are the model's own; it has no maps to explain with."""
    from tests.test_serve import build_test_index, start_server
    from vlsearch.encoders.features import FeatureExtractor
    from vlsearch.models.registry import load_model
    from vlsearch.search.rerank import Reranker

    joint, _ = tiny_deformers
    idx = build_test_index(tmp_path / "idx", mini_flickr)
    argv = ["search", "a dog runs", "--index", str(idx), "--k", "5", "--json"]
    assert main([*argv, "--rerank", "8", "--rerank-model", str(joint)]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert len(hits) == 5 and all(h["slow_score"] is not None for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # the Reranker's scores are the model's own pair scores, fused with its dev weight
    fx = FeatureExtractor(progress=False)
    rr = Reranker.load(joint, extractor=fx)
    keys = fx.image_keys(load_dataset_paths(mini_flickr)[:6]).keys
    fused, slow, _ = rr.rerank_text("a dog runs", keys, np.zeros(6, np.float32))
    model = load_model(joint)[0].eval()
    states, lengths, _ = fx.encode_texts(["a dog runs"])
    grid = torch.from_numpy(fx.images.get_stacked(keys, "grid"))
    mid = torch.from_numpy(fx.images.get_stacked(keys, "mid"))
    own = model.score_texts_images(torch.from_numpy(states), torch.from_numpy(lengths), grid, mid)[0]
    assert np.allclose(slow, own.numpy(), atol=1e-4)
    assert np.allclose(fused, model.config.fusion_weight * own.numpy(), atol=1e-4)
    with pytest.raises(QueryError, match="word-to-region"):
        rr.rerank_text("a dog runs", keys, np.zeros(6, np.float32), explain=True)
    # and over HTTP
    server = start_server(idx, rerank_model=str(joint))
    try:
        with server.client() as c:
            h = c.get("/healthz").json()["rerank"]
            assert h["enabled"] is True and h["model"] == str(joint)
            r = c.get("/search", params={"q": "a dog runs", "k": 5, "rerank": 8})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["rerank"] == 8 and len(body["results"]) == 5
            assert all(h["slow_score"] is not None for h in body["results"])
            r = c.get("/search", params={"q": "a dog runs", "k": 5, "rerank": 8, "explain": 1})
            assert r.status_code == 400 and "word-to-region" in r.text
    finally:
        server.stop()


def load_dataset_paths(root) -> list[str]:
    from vlsearch.data import load_dataset

    return load_dataset(root, "dev").image_paths

"""The Slow model, re-ranking, distillation and explanations, on tiny fixtures."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlsearch.cli import main
from vlsearch.precision import autocast, compute_dtype
from vlsearch.training.common import TrainRequest


@pytest.fixture(scope="session")
def tiny_slow_checkpoint(tiny_fast_checkpoint, mini_flickr, session_home):
    """A Slow model trained for a few seconds on the mini split; a test that asks for it finds it as the
    named model `slow` in its own home (conftest's ``_home``)."""
    from vlsearch.training import slow as slow_training

    req = TrainRequest(
        data_root=str(mini_flickr), out=str(session_home / "trained" / "slow"), quiet=True, minutes=0.05
    )
    return slow_training.train_and_save(req)


@pytest.fixture(scope="session")
def tiny_prior_slow_checkpoint(tiny_fast_checkpoint, mini_flickr, session_home):
    """`vlsearch train slow --fast-prior` for a few seconds: trained on out-of-fold Fast priors."""
    from vlsearch.training import slow as slow_training

    req = TrainRequest(
        data_root=str(mini_flickr),
        out=str(session_home / "trained" / "slow-prior"),
        quiet=True,
        minutes=0.05,
        fast_prior=True,
    )
    return slow_training.train_and_save(req)


def test_slow_trains_without_a_prior_by_default(tiny_slow_checkpoint):
    from vlsearch.models.registry import load_model

    slow, meta, _ = load_model(tiny_slow_checkpoint)
    assert slow.config.fast_prior is None and getattr(slow, "prior", None) is None
    assert "out_of_fold_priors" not in meta


def _small_model():
    from vlsearch.models.slow import SlowConfig, SlowModel

    torch.manual_seed(0)
    return SlowModel(SlowConfig(n_layers=2), init_from_pretrained=False).eval()


def test_block_pairs_and_forward_agree():
    model = _small_model()
    T, N, L = 3, 4, 9
    states, lengths = torch.randn(T, L, 384), torch.tensor([9, 5, 7])
    mid, grid = torch.randn(N, 196, 112), torch.randn(N, 49, 1280)
    with torch.no_grad():
        text, kv = model.text_state(states, lengths), model.image_kv(grid, mid)
        block = model.score_block(text, kv)
        ti, ii = torch.arange(T).repeat_interleave(N), torch.arange(N).repeat(T)
        pairs = model.score_pairs(text, kv, ti, ii)
        fwd = model(states[ti], lengths[ti], grid[ii], mid[ii])
    assert block.shape == (T, N)
    assert torch.allclose(block.flatten(), pairs, atol=1e-4)
    assert torch.allclose(pairs, fwd, atol=1e-4)
    assert block.std() > 0  # scores depend on the pair
    # padding beyond a text's length does not change its score
    with torch.no_grad():
        short = model.score_block(model.text_state(states[1:2, :5], lengths[1:2]), kv)
    assert torch.allclose(short[0], block[1], atol=1e-4)


def test_one_query_scores_through_the_weights_as_from_keys_and_values():
    """A query's few words go through the key/value weights onto the image tokens (no keys/values are
    computed, the state keeps none); a block of many texts computes them once and keeps them. Both give
    score_block's scores: equal in fp32, within bf16's noise of fp32 on the inference copy."""
    from vlsearch.models.slow import through_weights
    from vlsearch.precision import autocast, inference_copy

    model = _small_model()
    states, lengths = torch.randn(10, 13, 384), torch.tensor([13, 4, 9, 13, 7, 2, 13, 5, 11, 3])
    mid, grid = torch.randn(7, 196, 112), torch.randn(7, 49, 1280)
    with torch.no_grad():
        text, kv = model.text_state(states, lengths), model.image_kv(grid, mid)
        want = model.score_block(text, kv)
        one = model.image_state(grid, mid)
        for i in range(len(states)):
            got = model.score(text.rows(slice(i, i + 1)), one)
            assert torch.allclose(got, want[i : i + 1], atol=1e-4)
        assert one.kv is None  # one query at a time computed no keys/values
        assert not through_weights(10, 13, model.layers[0].cross_attn.heads, 384)
        many = model.image_state(grid, mid)
        assert torch.allclose(model.score(text, many), want, atol=1e-4)
        assert many.kv is not None and torch.equal(many.kv[0][0], kv[0][0])  # kept for the next block
        assert torch.allclose(model.score(text, many.rows(slice(2, 5))), want[:, 2:5], atol=1e-4)
    low_model = inference_copy(model)
    with torch.no_grad(), autocast():
        low_text, low_image = low_model.text_state(states, lengths), low_model.image_state(grid, mid)
        low = torch.cat([low_model.score(low_text.rows(slice(i, i + 1)), low_image) for i in range(10)])
    assert torch.corrcoef(torch.stack([low.float().flatten(), want.flatten()]))[0, 1] > 0.99


def test_fused_attention_scores_as_the_materialised_weights_do():
    """Scores without word maps go through fused attention (scaled_dot_product_attention, bf16 tokens
    under autocast); with maps through explicit softmax weights. Both are the same function: equal in
    fp32, and within bf16's noise of fp32 on the inference copy."""
    from vlsearch.precision import autocast, inference_copy

    model = _small_model()
    states, lengths = torch.randn(2, 11, 384), torch.tensor([11, 6])
    mid, grid = torch.randn(40, 196, 112), torch.randn(40, 49, 1280)
    with torch.no_grad():
        text, image = model.text_state(states, lengths), model.image_state(grid, mid)
        fused = model.score(text, image)
        explained, maps = model.score_with_maps(text, image)
    assert torch.allclose(fused, explained, atol=1e-5)
    assert maps.shape == (2, 40, 11, 196)
    fast = inference_copy(model)
    with torch.no_grad(), autocast():
        low = fast.score(fast.text_state(states, lengths), fast.image_state(grid, mid)).float()
    assert torch.corrcoef(torch.stack([low.flatten(), fused.flatten()]))[0, 1] > 0.99


def test_allocator_keeps_freed_memory_once(monkeypatch):
    """glibc keeps freed blocks for the next query (settings.keep_freed_memory); asking again is a no-op,
    and VLSEARCH_MALLOC=default opts out before the first call."""
    import platform

    from vlsearch import settings

    monkeypatch.setattr(settings, "_allocator_tuned", False)
    monkeypatch.setenv("VLSEARCH_MALLOC", "default")
    assert settings.keep_freed_memory() is False
    monkeypatch.delenv("VLSEARCH_MALLOC")
    applied = settings.keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert settings.keep_freed_memory() is applied


def test_fast_prior_starts_as_fast_and_carries_through_every_path(tiny_fast_checkpoint, monkeypatch):
    """A Slow model with a Fast prior scores exactly prior_scale x Fast cosine before training (its head's
    last layer is zero), in blocks, pairs and through the helpers that split and stack states; once the
    head has weights, the cross-attention changes the ranking. In fp32: on a bf16 CPU the paths' different
    padding rounds differently, which is bf16's noise, not a path that differs."""
    monkeypatch.setenv("VLSEARCH_PRECISION", "fp32")
    from dataclasses import asdict

    from vlsearch.models.registry import load_model
    from vlsearch.models.slow import SlowConfig, SlowModel
    from vlsearch.search.pair_scoring import text_states

    fast, _, _ = load_model(tiny_fast_checkpoint)
    torch.manual_seed(0)
    model = SlowModel(SlowConfig(fast_prior=asdict(fast.config)), init_from_pretrained=False)
    model.set_prior(fast)
    model.eval()
    T, N, L = 3, 5, 9
    states, lengths = torch.randn(T, L, 384), torch.tensor([9, 5, 7])
    mid, grid = torch.randn(N, 196, 112), torch.randn(N, 49, 1280)
    with torch.no_grad():
        text, kv = model.text_state(states, lengths), model.image_kv(grid, mid)
        assert len(kv) == len(model.layers) + 1
        want = fast.scale * fast.encode_text(states, lengths) @ fast.encode_image(grid).t()
        block = model.score_block(text, kv)
        assert torch.allclose(block, want, atol=1e-4)
        ti, ii = torch.arange(T).repeat_interleave(N), torch.arange(N).repeat(T)
        assert torch.allclose(model.score_pairs(text, kv, ti, ii), block.flatten(), atol=1e-4)
        rows = torch.tensor([2, 0])
        image = model.image_state(grid, mid)
        sub = model.score(text.rows(rows), image.rows(slice(1, 4)))
        assert torch.allclose(sub, block[rows][:, 1:4], atol=1e-4)
        stacked = text_states(model, states, lengths)
        assert torch.allclose(model.score(stacked, image), block, atol=1e-4)
        torch.nn.init.normal_(model.head[-1].weight, std=0.5)
        moved = model.score_block(text, kv)
    assert not torch.allclose(moved, block, atol=1e-3)
    assert all(not p.requires_grad for p in model.prior.parameters())
    model.train()
    assert not model.prior.training


def test_pair_scores_are_fp32_after_a_bf16_body():
    """The scoring head runs in fp32 on the inference copy: scores over 300 images are nearly all
    distinct (a bf16 logit would give ~130 values and ties would decide rankings)."""
    from vlsearch.precision import inference_copy

    model = inference_copy(_small_model())
    assert model.head[0].weight.dtype == torch.float32
    assert model.layers[0].self_attn.q.weight.dtype == compute_dtype()
    states, lengths = torch.randn(1, 9, 384), torch.tensor([9])
    mid, grid = torch.randn(300, 196, 112), torch.randn(300, 49, 1280)
    scores = model.score_texts_images(states, lengths, grid, mid)
    assert scores.dtype == torch.float32
    assert len(torch.unique(scores)) >= 295


def test_group_loss():
    from vlsearch.training.slow import group_loss

    scores = torch.randn(6, 3, requires_grad=True)
    cap_img = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = group_loss(scores, cap_img)
    loss.backward()
    assert torch.isfinite(loss) and scores.grad is not None
    # a perfect scorer has (near) zero loss
    perfect = torch.full((6, 3), -50.0)
    perfect[torch.arange(6), cap_img] = 50.0
    assert float(group_loss(perfect, cap_img)) < 1e-6
    # a scorer that prefers the wrong images has a large loss
    assert float(group_loss(-perfect, cap_img)) > 50


def test_group_sampler_groups():
    """Groups: the seed first, then hard negatives of one of its captions (only images with captions),
    random fill up to group_size, no image twice; every caption of every group image, each pointing at
    its image's position in the group; one epoch visits every captioned image once as a seed."""
    from vlsearch.training.slow import GroupSampler, SlowTrainConfig

    n = 10
    caption_image = torch.tensor([i for i in range(n) if i != 9 for _ in range(2)])  # image 9: no captions
    feats = SimpleNamespace(caption_image=caption_image, n_images=n)
    neg_img = np.array([[(c // 2 + 1 + j) % n for j in range(4)] for c in range(len(caption_image))])
    tc = SlowTrainConfig(group_size=4, group_hard=2, mine_k=4)
    sampler = GroupSampler(feats, neg_img, tc, np.random.default_rng(0))
    seeds = []
    for _ in range(9):
        images, captions, where, fold = sampler.group()
        assert fold == 0
        seeds.append(int(images[0]))
        assert len(images) == 4 and len(set(images.tolist())) == 4 and 9 not in images.tolist()
        hard = {(int(images[0]) + 1 + j) % n for j in range(4)} - {9}
        assert set(images[1:3].tolist()) <= hard  # two hard negatives of the seed's caption
        assert sorted(captions.tolist()) == sorted(c for i in images.tolist() for c in (2 * i, 2 * i + 1))
        assert (images[where] == caption_image[captions].numpy()).all()
    assert sorted(seeds) == list(range(9)) and sampler.epochs_done == 1.0


def test_group_sampler_keeps_a_group_inside_its_seeds_fold():
    """With out-of-fold priors every image of a group (hard negatives and random fill) is in the seed's
    fold, so one fold model scores the whole group as unseen data."""
    from vlsearch.training.crossfit import fold_assignment
    from vlsearch.training.slow import GroupSampler, SlowTrainConfig

    n = 40
    caption_image = torch.arange(n).repeat_interleave(2)
    fold_of = fold_assignment(n, 2, seed=0)
    assert sorted(np.bincount(fold_of).tolist()) == [20, 20]
    neg_img = np.array(
        [[j for j in range(n) if fold_of[j] == fold_of[c // 2] and j != c // 2][:6] for c in range(2 * n)]
    )
    feats = SimpleNamespace(caption_image=caption_image, n_images=n)
    sampler = GroupSampler(
        feats,
        neg_img,
        SlowTrainConfig(group_size=8, group_hard=4, mine_k=6),
        np.random.default_rng(0),
        fold_of,
    )
    for _ in range(2 * n):
        images, _, _, fold = sampler.group()
        assert (
            fold == fold_of[images[0]] and (fold_of[images] == fold).all() and len(set(images.tolist())) == 8
        )


def test_out_of_fold_priors(tiny_fast_checkpoint, mini_flickr, session_home):
    """Each fold's Fast model is trained without that fold, mines its hard negatives inside it, and
    replaces the Slow model's prior only while it is swapped in; the checkpoint keeps the full Fast prior."""
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.registry import load_model
    from vlsearch.models.slow import SlowConfig, SlowModel
    from vlsearch.training.crossfit import fold_priors

    fast, meta, _ = load_model(tiny_fast_checkpoint)
    train = DatasetFeatures.load(load_dataset(str(mini_flickr), "train"), mid=True, progress=False)
    recipe = {**meta["train"], "epochs": 2, "batch_size": 16}
    priors = fold_priors(train, fast, recipe, folds=2, mine_k=31, progress=False, log=lambda *_: None)
    cap_img = train.caption_image.numpy()
    fold_of = priors.fold_of_image
    assert priors.neg_img.shape == (len(cap_img), 29)  # 30 images a fold: 29 others
    assert (fold_of[priors.neg_img] == fold_of[cap_img][:, None]).all()
    assert (priors.neg_img != cap_img[:, None]).all()
    full = fast.state_dict()
    for model in priors.models:  # trained on its own: its weights are not the full model's
        assert model.config.concept_weight == fast.config.concept_weight
        assert any(not torch.equal(v, full[k]) for k, v in model.state_dict().items() if k in full)
    slow = SlowModel(
        SlowConfig(n_layers=1, fast_prior=asdict(fast.config)), init_from_pretrained=False
    ).eval()
    slow.set_prior(fast)
    grid, mid = train.grid[:4].float(), train.mid[:4].float()
    states, lengths = train.states[:3], train.lengths[:3]
    with torch.no_grad():
        own = slow.score_block(slow.text_state(states, lengths), slow.image_kv(grid, mid))
        with slow.prior_swapped(priors.models[0]):
            swapped = slow.score_block(slow.text_state(states, lengths), slow.image_kv(grid, mid))
        again = slow.score_block(slow.text_state(states, lengths), slow.image_kv(grid, mid))
    assert not torch.allclose(own, swapped) and torch.equal(own, again)
    assert all(torch.equal(v, fast.state_dict()[k]) for k, v in slow.prior.state_dict().items())
    lines = []  # a second call reuses the cached fold models: nothing is trained
    again_priors = fold_priors(train, fast, recipe, folds=2, mine_k=31, progress=False, log=lines.append)
    assert lines == [] and (again_priors.neg_img == priors.neg_img).all()


def test_distillation_teacher_scores_train_out_of_fold(tiny_prior_slow_checkpoint, mini_flickr):
    """A Slow model trained on out-of-fold priors teaches from out-of-fold scores: each caption's
    candidates come from its own fold, scored with that fold's Fast model as the prior; the target is the
    Slow score itself (it already holds Fast's cosine)."""
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.registry import load_model
    from vlsearch.search.pair_scoring import score_pairs_grouped
    from vlsearch.training.crossfit import fold_priors
    from vlsearch.training.distill import DistillConfig, distillation_teacher, teacher_logits

    slow, meta, _ = load_model(tiny_prior_slow_checkpoint)
    assert meta["out_of_fold_priors"]["folds"] == 2
    train = DatasetFeatures.load(load_dataset(str(mini_flickr), "train"), mid=True, progress=False)
    cand, scores, _, _ = teacher_logits(
        tiny_prior_slow_checkpoint, train, DistillConfig(), "fast", progress=False
    )
    fast, fast_meta, _ = load_model("fast")
    priors = fold_priors(train, fast, fast_meta["train"], 2, 31, progress=False, log=lambda *_: None)
    ci = train.caption_image.numpy()
    scored = np.flatnonzero(cand[:, 0] >= 0)
    assert len(scored) == train.n_images and (cand[scored, 0] == ci[scored]).all()
    assert (priors.fold_of_image[cand[scored]] == priors.fold_of_image[ci[scored]][:, None]).all()
    row = int(scored[0])
    args = (train.states, train.lengths, train.grid, train.mid, np.full(cand.shape[1], row), cand[row])
    with slow.prior_swapped(priors.models[int(priors.fold_of_image[ci[row]])]):
        out_of_fold = score_pairs_grouped(slow, *args)
    assert np.allclose(scores[row], out_of_fold, atol=1e-4)
    assert not np.allclose(scores[row], score_pairs_grouped(slow, *args), atol=1e-4)  # not the full prior
    teacher, _ = distillation_teacher(
        str(tiny_prior_slow_checkpoint), TrainRequest(data_root=str(mini_flickr), quiet=True)
    )
    assert torch.allclose(teacher.logits[scored], torch.from_numpy(scores[scored]))  # target: the Slow score


def test_mining_excludes_positives():
    from vlsearch.training.mining import mine_from_embeddings

    rng = np.random.default_rng(0)
    img = rng.normal(size=(12, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    ci = np.repeat(np.arange(12), 5)
    txt = img[ci] + 0.2 * rng.normal(size=(60, 8)).astype(np.float32)
    neg_img, neg_cap = mine_from_embeddings(img, txt, ci, 5)
    assert neg_img.shape == (60, 5) and neg_cap.shape == (12, 5)
    assert not (neg_img == ci[:, None]).any()
    assert not (ci[neg_cap] == np.arange(12)[:, None]).any()
    sim = txt @ img.T
    sim[np.arange(60), ci] = -np.inf
    assert (neg_img[:, 0] == sim.argmax(1)).all()  # best first


def test_place_candidates_never_drops_nor_duplicates():
    from vlsearch.search.fusion import place_candidates, top_k

    rng = np.random.default_rng(1)
    sim = rng.normal(size=(50, 30)).astype(np.float32)
    K = 7
    cand = top_k(sim, K)
    fused = rng.normal(size=cand.shape) * 100  # any scale
    out = place_candidates(sim, cand, fused)
    new_top = np.argsort(-out, axis=1)[:, :K]
    for r in range(len(sim)):
        assert sorted(new_top[r]) == sorted(cand[r])  # the same K, each once
        assert list(new_top[r]) == list(cand[r][np.argsort(-fused[r], kind="stable")])
        rest = [c for c in np.argsort(-sim[r]) if c not in set(cand[r])]
        assert list(np.argsort(-out[r])[K:]) == rest  # non-candidates keep their order


# The Fast model as `vlsearch train fast` makes it (the concept channel fused into the score), plain, and
# with the concept vector as a tower input: the teacher's cached tower inputs must serve each shape.
_STUDENTS = {
    "plain": {},
    "fused concepts": {"concepts": True, "concept_weight": 0.2, "concept_topk": 10},
    "concept input": {"concepts": True, "concept_input": True, "concept_weight": 0.2},
}


@pytest.mark.parametrize("student", list(_STUDENTS))
def test_distillation_loss_zero_when_student_and_teacher_agree(student):
    from vlsearch.models.fast import FastConfig, FastModel
    from vlsearch.training.losses import candidate_kl
    from vlsearch.training.slow import SlowTeacher

    s = torch.randn(8, 16)
    assert float(candidate_kl(s, s.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(candidate_kl(s, s + 3.0)) == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    assert float(candidate_kl(s, torch.randn(8, 16))) > 0
    # the hook itself: teacher logits equal to the student's own scores give zero
    torch.manual_seed(0)
    model = FastModel(FastConfig(text_layers=1, **_STUDENTS[student]), init_from_pretrained=False).eval()
    if model.concept is not None:  # a random head and label space, so the concept vector is not zero
        model.concept.head_weight.normal_(0, 0.05)
        model.concept.labels.normal_()
    grid = torch.randn(20, 49, 1280).half()
    train = SimpleNamespace(grid=grid)
    cands = torch.randint(0, 20, (10, 6))
    caps = torch.arange(10)
    text = torch.nn.functional.normalize(torch.randn(10, model.embed_dim), dim=-1)
    with torch.no_grad(), autocast():
        emb = model.encode_image(grid).float()
    logits = model.scale.detach() * (text[:, None, :] * emb[cands]).sum(-1)
    teacher = SlowTeacher(cands, logits, captions_per_step=0)
    with torch.no_grad():
        loss = teacher.loss(model, train, None, caps, None, text, 1.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    # captions the teacher did not score (candidates -1) are left out, whatever their logits
    partial = cands.clone()
    partial[5:] = -1
    noisy = logits.clone()
    noisy[5:] = torch.randn(5, 6) * 5
    with torch.no_grad():
        assert float(SlowTeacher(partial, noisy, 0).loss(model, train, None, caps, None, text, 1.0)) < 1e-5
    other = SlowTeacher(cands, torch.randn(10, 6) * 5, captions_per_step=4)
    with torch.no_grad():
        assert float(other.loss(model, train, None, caps, None, text, 1.0)) > 0


def test_word_maps_merge_pieces_and_drop_noise():
    from vlsearch.search.explain import word_maps

    tokens = ["[CLS]", "a", "skate", "##board", "##er", "jumps", ",", "high", ".", "[SEP]"]
    maps = np.random.default_rng(0).random((len(tokens), 196))
    maps /= maps.sum(1, keepdims=True)
    exp = word_maps(tokens, maps, 14)
    assert exp["tokens"] == ["skateboarder", "jumps", "high"]
    assert exp["grid"] == [14, 14]
    assert len(exp["maps"]) == 3 and all(len(m) == 196 for m in exp["maps"])
    assert all(abs(sum(m) - 1) < 1e-4 for m in exp["maps"])
    merged = maps[2:5].mean(0)
    assert np.allclose(exp["maps"][0], merged / merged.sum(), atol=1e-5)


def test_slow_checkpoint_round_trip(tiny_slow_checkpoint):
    from vlsearch.models.checkpoint import load_checkpoint
    from vlsearch.models.registry import load_model
    from vlsearch.models.slow import SlowModel

    model, meta, path = load_model("slow")
    assert meta["model_type"] == "slow" and isinstance(model, SlowModel) and model.is_pair_scorer
    assert "fusion_weight" in meta["config"] and meta["config"]["fusion_weight"] >= 0
    again, _ = load_checkpoint(path, SlowModel)
    assert again.config == model.config
    states, lengths = torch.randn(2, 6, 384), torch.tensor([6, 3])
    mid, grid = torch.randn(2, 196, 112), torch.randn(2, 49, 1280)
    with torch.no_grad():
        assert torch.allclose(model(states, lengths, grid, mid), again(states, lengths, grid, mid))


def test_train_slow_warm_start_from_cli(tiny_slow_checkpoint, mini_flickr, tmp_path, capsys):
    """`vlsearch train slow --init CKPT` continues a Slow model and records where it started; --init
    with another kind of model is a clear error."""
    out = tmp_path / "warm"
    common = ["--data-root", str(mini_flickr), "--minutes", "0.02", "--quiet"]
    assert main(["train", "slow", "--init", "slow", "--out", str(out), *common]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert Path(meta["warm_start"]["from"]).resolve() == tiny_slow_checkpoint.resolve()
    assert (
        meta["config"]["n_layers"]
        == json.loads((tiny_slow_checkpoint / "config.json").read_text())["config"]["n_layers"]
    )
    capsys.readouterr()
    assert main(["train", "slow", "--init", "fast", "--out", str(tmp_path / "bad"), *common]) == 2
    assert "not a Slow model" in capsys.readouterr().err


def test_trained_slow_model_is_saved_before_the_dev_step(
    tiny_slow_checkpoint, mini_flickr, tmp_path, monkeypatch
):
    """A failure while choosing the fusion weights on dev does not lose the training run."""
    from vlsearch.models.registry import load_model
    from vlsearch.training import slow as slow_training

    def broken(*args, **kwargs):
        raise RuntimeError("dev step failed")

    monkeypatch.setattr(slow_training, "choose_fusion_weights", broken)
    out = tmp_path / "kept"
    req = TrainRequest(data_root=str(mini_flickr), out=str(out), quiet=True, minutes=0.02, init="slow")
    with pytest.raises(RuntimeError, match="dev step failed"):
        slow_training.train_and_save(req)
    model, meta, _ = load_model(out)
    assert meta["history"]["steps"] > 0 and model.config.fusion_weight == 0.02


def test_eval_slow_alone_and_rerank(tiny_slow_checkpoint, mini_flickr, capsys):
    root = ["--data-root", str(mini_flickr), "--split", "dev", "--images", "12", "--json"]
    assert main(["eval", "--model", "slow", *root]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert slow["n_images"] == 12 and "slow_ms_per_query_gallery" in slow["cost"]
    assert main(["eval", *root]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main(["eval", "--rerank", "5", *root]) == 0
    rr = json.loads(capsys.readouterr().out)
    cost = rr["cost"]
    assert rr["rerank"] == 5 and cost["slow_pairs_per_query"] == 5
    for key in ("fast_encode_ms", "rerank_ms_per_query", "slow_alone_ms_per_query_gallery"):
        assert cost[key] > 0
    # re-ranking only reorders the top 5: recall at 5 (t2i) cannot change, recall at 10 neither
    assert rr["t2i"]["r5"] == pytest.approx(fast["t2i"]["r5"])
    assert rr["t2i"]["r10"] == pytest.approx(fast["t2i"]["r10"])


def test_rerank_eval_keeps_each_rows_candidates(tiny_slow_checkpoint, mini_flickr):
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.embed import embed_features
    from vlsearch.models.registry import load_model
    from vlsearch.search.fusion import top_k
    from vlsearch.search.pair_scoring import rerank_eval

    feats = DatasetFeatures.load(load_dataset(mini_flickr, "dev"), mid=True, progress=False)
    fast, _, _ = load_model("fast")
    img, txt = embed_features(fast, feats)
    sim = txt @ img.T
    K = 6
    sim_t2i, sim_i2t, cost = rerank_eval("slow", feats, sim, K, progress=False)
    assert np.array_equal(np.sort(top_k(sim_t2i, K), 1), np.sort(top_k(sim, K), 1))
    assert np.array_equal(np.sort(top_k(sim_i2t.T, K), 1), np.sort(top_k(sim.T, K), 1))
    assert cost["slow_alone_pairs_per_query"] == feats.n_images


def test_each_caption_scored_alone_as_the_grouped_pairs_are(tiny_slow_checkpoint, mini_flickr, monkeypatch):
    """Eval re-ranks each caption's top-K in one call, as a query is re-ranked online
    (score_each_text); the scores are those of the same pairs grouped by image (fp32: exactly the
    same function, through the weights or from keys/values)."""
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.registry import load_model
    from vlsearch.search.pair_scoring import score_each_text, score_pairs_grouped

    feats = DatasetFeatures.load(load_dataset(mini_flickr, "dev"), mid=True, progress=False)
    monkeypatch.setenv("VLSEARCH_PRECISION", "fp32")  # the scoring, not the cached features
    model, _, _ = load_model("slow")
    rng = np.random.default_rng(0)
    M, K = 12, 5
    cand = np.stack([rng.choice(feats.n_images, K, replace=False) for _ in range(M)])
    alone = score_each_text(model, feats.states[:M], feats.lengths[:M], feats.grid, feats.mid, cand)
    grouped = score_pairs_grouped(
        model, feats.states, feats.lengths, feats.grid, feats.mid, np.repeat(np.arange(M), K), cand.ravel()
    ).reshape(M, K)
    assert alone.shape == (M, K) and alone.std() > 0
    np.testing.assert_allclose(alone, grouped, atol=1e-4)


def test_search_rerank_and_explain(tiny_slow_checkpoint, mini_flickr, tmp_path, capsys):
    import vlsearch
    from vlsearch.index.build import build_index

    out = tmp_path / "idx"
    build_index(out, mini_flickr, "dev", progress=False)
    engine = vlsearch.load(out, rerank_model="slow")
    plain = engine.search("a dog runs through the grass", k=8)
    res = engine.search("a dog runs through the grass", k=8, rerank=8, explain=True)
    assert sorted(h.row for h in res.hits) == sorted(h.row for h in plain.hits)  # same 8, each once
    assert all(h.slow_score is not None for h in res.hits)
    assert [h.score for h in res.hits] == sorted((h.score for h in res.hits), reverse=True)
    assert len(res.explanations) == 8
    for exp in res.explanations:
        assert exp["tokens"] == ["dog", "runs", "grass"]
        assert exp["grid"] == [14, 14]
        assert len(exp["maps"]) == len(exp["tokens"]) and all(len(m) == 196 for m in exp["maps"])
    # the CLI writes one JSON and one PNG per result
    exp_dir = tmp_path / "explain"
    args = ["search", "a dog on the beach", "--index", str(out), "--k", "3", "--rerank", "5"]
    assert main([*args, "--explain", str(exp_dir), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["results"]) == 3
    files = sorted(p.name for p in exp_dir.iterdir())
    assert len([f for f in files if f.endswith(".json")]) == 3
    assert len([f for f in files if f.endswith(".png")]) == 3
    first = json.loads((exp_dir / files[0]).read_text())
    assert first["tokens"] == ["dog", "beach"] and len(first["maps"]) == 2


def test_feature_dropout_changes_training_and_off_is_deterministic(mini_flickr):
    """`SlowTrainConfig.feature_dropout` reaches the feature maps: the same seed and steps give the same
    weights with it off, and other weights with it on."""
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.slow import SlowConfig
    from vlsearch.training.slow import SlowTrainConfig, train_slow

    train = DatasetFeatures.load(load_dataset(str(mini_flickr), "train"), mid=True, progress=False)
    neg_img = np.stack([(np.arange(6) + 1 + i) % train.n_images for i in range(train.n_images)])
    neg_img = neg_img[train.caption_image.numpy()]

    def weights(dropout):
        tc = SlowTrainConfig(group_size=6, group_hard=3, mine_k=6, feature_dropout=dropout, flip=False)
        kw = dict(progress=False, log=lambda *_: None, init_from_pretrained=False, max_steps=2)
        model, history = train_slow(train, neg_img, SlowConfig(n_layers=1), tc, **kw)
        assert history["steps"] == 2
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    off = weights(0.0)
    assert torch.equal(off, weights(0.0))
    assert not torch.allclose(off, weights(0.5))

"""The concept channel: the backbone's own ImageNet head from cached features, the packaged class list,
and a search on real COCO photos (indexed as a plain folder) that must beat the same model without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import COCO, need_data


def test_class_list_is_checked():
    from vlsearch.encoders import concepts as C
    from vlsearch.errors import CheckpointError

    lemmas = C.class_lemmas()
    assert len(lemmas) == 1000
    names = C.class_names()
    assert names[281] == "tabby" and "tabby cat" in lemmas[281] and names[963] == "pizza"
    with pytest.raises(CheckpointError, match="1000"):
        C.class_lemmas("0" * 64)
    glosses = C.class_definitions()  # same synsets, same order, hash-checked
    assert len(glosses) == 1000 and "cat" in glosses[281] and "pie" in glosses[963]


def test_head_from_cached_grid_is_the_backbones_classifier():
    """logits from the 7x7 grid = the backbone's own forward (exactly in fp32; fp16 cache: same top-1)."""
    need_data()
    from vlsearch.data.images import load_image
    from vlsearch.encoders.concepts import classifier_head, logits_from_grid
    from vlsearch.encoders.features import FeatureExtractor
    from vlsearch.encoders.image import ImageBackbone

    paths = sorted((COCO / "train2017").glob("*.jpg"))[:4]
    fx = FeatureExtractor(progress=False)
    backbone = fx.image_backbone
    assert isinstance(backbone, ImageBackbone)
    w, b = classifier_head(backbone.net)
    x = torch.from_numpy(np.stack([load_image(p, 224) for p in paths]))
    with torch.no_grad():
        reference = backbone.net((x.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5)
    with torch.no_grad():
        mine = logits_from_grid(backbone.features(x, bf16=False)["grid"], w, b)
    assert torch.allclose(mine, reference, atol=1e-4), (mine - reference).abs().max()
    keys = fx.image_keys(paths).keys
    cached = logits_from_grid(torch.from_numpy(fx.images.get_stacked(keys, "grid")), w, b)
    assert (cached.argmax(1) == reference.argmax(1)).all()
    assert (cached - reference).abs().max() < 0.05


@pytest.fixture(scope="module")
def concept_fast(tiny_fast_checkpoint, tmp_path_factory):
    """The conftest Fast model with its concept channel calibrated on the mini Flickr8k dev split."""
    from vlsearch.data import load_dataset
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.models.checkpoint import save_checkpoint
    from vlsearch.models.registry import load_model
    from vlsearch.training.concepts import attach_concepts, choose_concept_weight

    net, meta, _ = load_model(tiny_fast_checkpoint)
    attach_concepts(net)
    root = json.loads((tiny_fast_checkpoint / "config.json").read_text())["data_root"]
    dev = DatasetFeatures.load(load_dataset(root, "dev"), progress=False)
    chosen = choose_concept_weight(net, dev, log=lambda *_: None)
    out = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "fast-concepts", net, {"concepts": chosen})
    return out, chosen


def _first_captions() -> dict[str, str]:
    ann = json.loads(next((COCO / "annotations").glob("captions_*.json")).read_text())
    name = {im["id"]: im["file_name"] for im in ann["images"]}
    first: dict[str, str] = {}
    for a in sorted(ann["annotations"], key=lambda a: a["id"]):
        first.setdefault(name[a["image_id"]], a["caption"].strip())
    return first


def test_concepts_beat_fast_alone_on_coco_folder(concept_fast, tmp_path):
    """Index coco-mini as a plain folder twice (channel on / --no-concepts); query each image's first
    caption; the right image's median rank must be better with concepts, in this run."""
    need_data()
    from vlsearch.index.build import build_index
    from vlsearch.search.engine import SearchEngine

    ckpt, chosen = concept_fast
    assert chosen["weight"] > 0, chosen  # dev chose to use the channel at all
    medians = {}
    for on in (True, False):
        out = tmp_path / f"idx-{on}"
        build_index(out, COCO / "train2017", model=str(ckpt), kind="flat", progress=False, concepts=on)
        engine = SearchEngine.open(out)
        assert engine.index.config.concepts is on
        assert engine.index.config.dim == (256 + 384 if on else 256)
        ranks = []
        for file_name, caption in _first_captions().items():
            hits = engine.search(caption, k=80).hits
            ranks.append([h.path.endswith(file_name) for h in hits].index(True))
        medians[on] = float(np.median(ranks))
    assert medians[True] < medians[False], medians


def test_why_prints_concept_tags(concept_fast, tmp_path, capsys):
    need_data()
    from vlsearch.cli import main
    from vlsearch.index.build import build_index

    ckpt, _ = concept_fast
    out = tmp_path / "idx"
    build_index(out, COCO / "train2017", model=str(ckpt), kind="flat", progress=False)
    assert main(["search", "an elephant", "--index", str(out), "--k", "3", "--why", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert all(r["concepts"] for r in res)
    names = [n for r in res for n, _ in r["concepts"]]
    assert any("elephant" in n or n == "tusker" for n in names), names


def test_mismatched_class_list_is_refused(concept_fast, tmp_path):
    from vlsearch.errors import CheckpointError
    from vlsearch.models.registry import load_model

    ckpt, _ = concept_fast
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["concept_classes_sha256"] = "f" * 64
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="concept class list"):
        load_model(bad)


def test_pseudo_captions_name_confident_images_and_train(mini_flickr):
    """Pseudo-captions go to the images whose top ImageNet class is confident, name that class, and give
    the training a term of their own (same seed: other weights than without them)."""
    from vlsearch.data import load_dataset
    from vlsearch.encoders import concepts as C
    from vlsearch.encoders.dataset_features import DatasetFeatures
    from vlsearch.encoders.image import ImageBackbone
    from vlsearch.models.fast import FastConfig
    from vlsearch.training.concepts import PseudoCaptions
    from vlsearch.training.fast import FastTrainConfig, train_fast

    train = DatasetFeatures.load(load_dataset(str(mini_flickr), "train"), progress=False)
    pseudo = PseudoCaptions(train.grid, threshold=0.3)
    assert 2 <= pseudo.n_images < train.n_images, pseudo.n_images
    weight, bias = C.classifier_head(ImageBackbone().net)
    probs = C.concept_distribution(C.logits_from_grid(train.grid, weight, bias))
    confident = probs.max(-1).values >= 0.3
    assert torch.equal(pseudo.label >= 0, confident)
    assert torch.equal(pseudo.label[confident], probs.argmax(-1)[confident])
    for c, texts in pseudo.texts_of.items():
        assert all(any(name in pseudo.texts[t] for name in C.class_lemmas()[c]) for t in texts)

    tc = dict(epochs=1, batch_size=16, warmup_steps=1, seed=0)
    runs = {}
    for w in (0.0, 1.0):
        cfg = FastTrainConfig(**tc, pseudo_weight=w, pseudo_threshold=0.3)
        model, history = train_fast(train, FastConfig(), cfg, progress=False, log=lambda *_: None)
        runs[w] = (model, history)
    assert runs[1.0][1]["pseudo"] == {"images": pseudo.n_images, "classes": pseudo.n_classes}
    assert "pseudo" not in runs[0.0][1]
    a, b = (runs[w][0].text_proj.weight for w in (0.0, 1.0))
    assert not torch.allclose(a, b)


def test_training_sees_the_channel_it_is_served_with():
    """The fused loss puts the concept channel in the model during training, with the prompts and top-k
    it will be calibrated and served with; without it the towers train alone."""
    from vlsearch.training.fast import FastTrainConfig, fast_config

    tc = FastTrainConfig()
    cfg = fast_config(tc)
    assert cfg.concepts and cfg.concept_weight == tc.concept_train_weight > 0
    assert (cfg.concept_prompts, cfg.concept_topk, cfg.concept_temperature) == (
        tc.concept_prompts,
        tc.concept_topk,
        tc.concept_temperature,
    )
    assert not fast_config(FastTrainConfig(concept_train_weight=0.0)).concepts
    assert fast_config(FastTrainConfig(concept_train_weight=0.0, concept_input=True)).concept_input

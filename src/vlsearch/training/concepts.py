"""The concept channel in training: calibrating it on a trained Fast model, and pseudo-captions from it.

Calibration trains nothing: the zero-shot concept score (vlsearch.encoders.concepts) is added to the Fast
score with the weight that gives the best RSUM on Flickr8k dev; the weight is saved in the checkpoint's
config. Other galleries (coco-mini) are only ever used to check it, never to choose it. Pseudo-captions
(``PseudoCaptions``) turn the backbone's confident ImageNet labels into extra training pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from vlsearch.encoders import concepts as C
from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.encoders.features import pad
from vlsearch.encoders.image import ImageBackbone
from vlsearch.encoders.text import TextBackbone
from vlsearch.eval.metrics import retrieval_metrics
from vlsearch.models.fast import ConceptChannel, FastModel
from vlsearch.precision import autocast
from vlsearch.training.losses import info_nce

WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.7, 1.0)


def attach_concepts(
    model: FastModel, prompts: str = "single", temperature: float = 1.0, topk: int = 0
) -> FastModel:
    """Give a trained Fast model (with or without a channel) a fresh concept channel, weight 0. A hubness
    bank (models/hubness.py) holds the old channel's embeddings, so it goes too (training.hubness)."""
    cfg = model.config
    cfg.hubness_bank, cfg.hubness_weight, model.hubness = 0, 0.0, None
    cfg.concepts, cfg.concept_weight = True, 0.0
    cfg.concept_prompts, cfg.concept_temperature, cfg.concept_topk = prompts, temperature, topk
    if cfg.concept_input and model.concept is not None:  # its tower was trained on this channel: keep it
        model.concept.set_prompts(prompts)
    else:
        model.concept = ConceptChannel(cfg, init_from_pretrained=True)
    return model.eval()


@torch.no_grad()
def channel_sims(
    model: FastModel, feats: DatasetFeatures, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(Fast similarity, concept similarity), each [captions, images], for one gallery."""
    weight, model.config.concept_weight = model.config.concept_weight, 0.0
    try:
        img, ci, txt, ct = [], [], [], []
        for s in range(0, feats.n_images, batch):
            g = feats.grid[s : s + batch]
            img.append(model.encode_image(g).float())
            ci.append(model.concept.image(g))
        for s in range(0, len(feats.states), batch):
            st, ln = feats.states[s : s + batch], feats.lengths[s : s + batch]
            txt.append(model.encode_text(st, ln).float())
            ct.append(model.concept.text(st, ln))
    finally:
        model.config.concept_weight = weight
    fast = (torch.cat(txt) @ torch.cat(img).T).numpy()
    concept = (torch.cat(ct) @ torch.cat(ci).T).numpy()
    return fast, concept


def sweep(fast: np.ndarray, concept: np.ndarray, caption_image, weights=WEIGHTS) -> list[dict]:
    """Metrics of Fast + w x concepts for each w (the same ranking faiss gives the fused vectors)."""
    caption_image = np.asarray(caption_image)
    return [{"weight": w, **retrieval_metrics(fast + w * concept, caption_image)} for w in weights]


def choose_concept_weight(model: FastModel, dev: DatasetFeatures, weights=WEIGHTS, log=print) -> dict:
    """Set model.config.concept_weight to the dev-RSUM-best weight; returns the sweep."""
    fast, concept = channel_sims(model, dev)
    rows = sweep(fast, concept, dev.caption_image.numpy(), weights)
    alone = retrieval_metrics(concept, dev.caption_image.numpy())
    best = max(rows, key=lambda r: (r["rsum"], -r["weight"]))
    model.config.concept_weight = float(best["weight"])
    log(
        f"concept weight {best['weight']} on dev: RSUM {rows[0]['rsum']:.1f} -> {best['rsum']:.1f} "
        f"(t2i R@1 {rows[0]['t2i']['r1']:.1f} -> {best['t2i']['r1']:.1f}; concepts alone {alone['rsum']:.1f})"
    )
    return {
        "weight": best["weight"],
        "sweep": [{"weight": r["weight"], "rsum": r["rsum"], "t2i_r1": r["t2i"]["r1"]} for r in rows],
        "concepts_alone_rsum": alone["rsum"],
    }


class PseudoCaptions:
    """Extra training pairs from what the backbone's ImageNet head is sure of: an image whose top class
    has probability >= ``threshold`` is also captioned "a photo of a {name}." (a random prompt and name
    variant each time). They teach the Fast towers the names of things Flickr8k's captions rarely say,
    with no human caption. Rows that share a class are not pushed apart (info_nce's ``same`` mask)."""

    def __init__(self, grid: torch.Tensor, threshold: float = 0.5, batch: int = 1024):
        weight, bias = C.classifier_head(ImageBackbone().net)
        probs = torch.cat(
            [
                C.concept_distribution(C.logits_from_grid(grid[s : s + batch], weight, bias))
                for s in range(0, len(grid), batch)
            ]
        )
        top, cls = probs.max(-1)
        self.label = torch.where(top >= threshold, cls, torch.full_like(cls, -1))
        classes = sorted(set(self.label[self.label >= 0].tolist()))
        texts, self.texts_of = [], {}
        for c in classes:
            variants = C.class_texts(c)  # 4 prompts x 2 names
            self.texts_of[c] = list(range(len(texts), len(texts) + len(variants)))
            texts += variants
        self.texts = texts
        if texts:
            states, _ = TextBackbone().encode(texts)  # a few thousand short prompts: one batch
            self.lengths = torch.tensor([len(x) for x in states])
            self.states = torch.from_numpy(pad(states))

    @property
    def n_images(self) -> int:
        return int((self.label >= 0).sum())

    @property
    def n_classes(self) -> int:
        return len(self.texts_of)

    def loss(self, model, imgs: torch.Tensor, image_emb: torch.Tensor, rng, bf16: bool = True):
        """InfoNCE between the batch's confident images (their embeddings as trained this step) and
        their pseudo-captions; 0 when fewer than two rows of the batch are confident."""
        lab = self.label[imgs]
        rows = torch.nonzero(lab >= 0).squeeze(1)
        if len(rows) < 2:
            return image_emb.new_zeros(())
        lab = lab[rows]
        pick = torch.tensor([self.texts_of[c][rng.integers(len(self.texts_of[c]))] for c in lab.tolist()])
        lengths = self.lengths[pick]
        states = self.states[pick, : int(lengths.max())]
        with autocast(bf16):
            text = model.encode_text(states, lengths)
        return info_nce(image_emb[rows], text.float(), model.scale, lab[:, None] == lab[None, :])

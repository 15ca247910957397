"""Calibrating the hubness prior (models/hubness.py) on a trained Fast model. Nothing is trained.

The bank is one caption per train image (its first), embedded by the model itself; the temperature is the
model's own (1 / its logit scale); the weight is the one that gives the best text-to-image recall sum on
Flickr8k dev (the prior is a per-image constant, so image-to-text ranking does not move). Other galleries
(coco-mini) only check it.
"""

from __future__ import annotations

import numpy as np
import torch

from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.eval.metrics import retrieval_metrics
from vlsearch.models.embed import embed_features, embed_images
from vlsearch.models.fast import FastModel
from vlsearch.models.hubness import HubnessPrior
from vlsearch.precision import autocast

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@torch.no_grad()
def attach_hubness(model: FastModel, train: DatasetFeatures, batch: int = 1024) -> FastModel:
    """Give a trained Fast model a bank from ``train`` (one caption per image), weight 0 (off)."""
    cfg = model.config
    caption_image = train.caption_image.numpy()
    rows = torch.from_numpy(np.unique(caption_image, return_index=True)[1])
    fast, concept = [], []
    with autocast():
        for s in range(0, len(rows), batch):
            r = rows[s : s + batch]
            st, ln = train.states[r], train.lengths[r]
            fast.append(model.fast_text(st, ln).float())
            if model.concept is not None:
                concept.append(model.concept.text(st, ln).float())
    cfg.hubness_bank, cfg.hubness_weight = len(rows), 0.0
    cfg.hubness_temperature = float(1.0 / model.scale.item())
    model.hubness = HubnessPrior(len(rows), cfg.embed_dim, cfg.text_dim if cfg.concepts else 0)
    model.hubness.set_bank(torch.cat(fast), torch.cat(concept) if concept else None)
    model.use_hubness = True
    img = embed_images(model, train, batch)  # weight 0 still: no prior column
    cfg.hubness_offset = float(
        HubnessPrior.log_prior(img, model.hubness_bank(), cfg.hubness_temperature).mean()
    )
    return model.eval()


@torch.no_grad()
def choose_hubness_weight(model: FastModel, dev: DatasetFeatures, weights=WEIGHTS, log=print) -> dict:
    """Set model.config.hubness_weight to the weight with the best dev text-to-image recall sum."""
    cfg = model.config
    cfg.hubness_weight = 0.0
    img, txt = embed_features(model, dev)  # weight 0: no prior column
    prior = HubnessPrior.log_prior(torch.from_numpy(img), model.hubness_bank(), cfg.hubness_temperature)
    prior = prior.numpy() - cfg.hubness_offset
    sim = txt @ img.T
    caption_image = dev.caption_image.numpy()
    rows = []
    for w in weights:
        m = retrieval_metrics(sim - w * prior[None, :], caption_image)
        t2i = m["t2i"]
        rows.append({"weight": w, "t2i_r1": t2i["r1"], "t2i_sum": t2i["r1"] + t2i["r5"] + t2i["r10"]})
    best = max(rows, key=lambda r: (round(r["t2i_sum"], 6), -r["weight"]))
    cfg.hubness_weight = float(best["weight"])
    log(
        f"hubness weight {best['weight']} on dev (bank {cfg.hubness_bank}, T {cfg.hubness_temperature:.4f}): "
        f"t2i R@1 {rows[0]['t2i_r1']:.2f} -> {best['t2i_r1']:.2f}, "
        f"R@1+5+10 {rows[0]['t2i_sum']:.2f} -> {best['t2i_sum']:.2f}"
    )
    return {
        "weight": best["weight"],
        "bank": cfg.hubness_bank,
        "temperature": cfg.hubness_temperature,
        "offset": cfg.hubness_offset,
        "sweep": rows,
    }

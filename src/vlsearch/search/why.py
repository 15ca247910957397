"""Why a result came up: the ImageNet concepts that drove its concept score, for people to read.

A hit's concept score is sum_k p_k (q . e_k) / |sum_k p_k e_k| (p: the image's class probabilities, e_k:
class-name embeddings, q: the query in MiniLM's space), so each class's share is p_k (q . e_k). The tags
are the classes with the largest shares, shown with their probability in the image.
"""

from __future__ import annotations

import numpy as np
import torch

from vlsearch.encoders.concepts import class_names
from vlsearch.precision import autocast


def has_concepts(model) -> bool:
    return getattr(model, "concept", None) is not None


@torch.no_grad()
def concept_tags(embedder, text: str | None, keys: list[str], k: int = 5, min_weight: float = 0.01) -> list:
    """Per image key: [(class name, probability in the image), ...] for the top-k classes by their share
    of the query's concept score (by probability alone when ``text`` is None). [] without a channel."""
    model = embedder.model
    if not has_concepts(model) or not keys:
        return [[] for _ in keys]
    grid = torch.from_numpy(np.asarray(embedder.extractor.images.get_stacked(keys, "grid"), np.float32))
    probs = model.concept.probs(grid).numpy()
    share = probs
    if text:
        states, lengths, _ = embedder.extractor.encode_texts([text])
        with autocast():  # the embedder's copy holds bf16 linear weights on a bf16 CPU
            q = model.concept.text(torch.from_numpy(states).float(), torch.from_numpy(lengths)).float()
        sims = (model.concept.labels @ q[0]).numpy()
        share = probs * np.clip(sims, 0, None)[None, :]
    names = class_names()
    out = []
    for p, s in zip(probs, share, strict=True):
        top = np.argsort(-s)[:k]
        out.append([(names[i], round(float(p[i]), 3)) for i in top if p[i] >= min_weight])
    return out

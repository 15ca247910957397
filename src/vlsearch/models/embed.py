"""Every image and caption of a DatasetFeatures through a dual encoder, in batches (eval, mining, dev)."""

from __future__ import annotations

import numpy as np
import torch

from vlsearch.encoders.dataset_features import DatasetFeatures
from vlsearch.precision import autocast


def embed_features(model, feats: DatasetFeatures, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings [N,D], caption embeddings [M,D]) as fp32 numpy, from the model's grid-only
    ``encode_image`` and ``encode_text``."""
    img = embed_images(model, feats, batch)
    with torch.no_grad(), autocast():
        txt = torch.cat(
            [
                model.encode_text(feats.states[s : s + batch], feats.lengths[s : s + batch]).float()
                for s in range(0, len(feats.states), batch)
            ]
        )
    return img.numpy(), txt.numpy()


def embed_images(model, feats: DatasetFeatures, batch: int = 1024) -> torch.Tensor:
    """Every image of a DatasetFeatures through ``encode_image`` (grid only): fp32 [N, D]."""
    model.eval()
    with torch.no_grad(), autocast():
        return torch.cat(
            [model.encode_image(feats.grid[s : s + batch]).float() for s in range(0, feats.n_images, batch)]
        )

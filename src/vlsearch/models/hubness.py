"""The hubness prior: a per-image score correction that stops a few images from crowding every result list.

In a joint space some images sit close to almost every caption ("hubs"), and rank high for queries they do
not match. The inverted softmax (Smith et al., ICLR 2017; QB-Norm, Bogolin et al., CVPR 2022) divides
each image's score by how strongly the image matches a bank of typical queries. In log space that is one
number per image, computed once at indexing time:

    prior(x) = T * log(mean_b exp(bank_b . x / T)),    score(q, x) = q . x - weight * (prior(x) - offset)

The bank is fixed (one caption per Flickr8k train image, embedded by the model itself), not the queries of
the evaluation, so nothing is learned from the test set. The weight is chosen on dev; ``offset`` (the mean
prior over the train images) only keeps scores near the cosine scale. The prior is one extra column of
the vectors: an image carries ``-weight * (prior - offset)``, a text query carries 1, so any inner-product
index (Flat, HNSW, IVF) searches the corrected score as it is. An image used as a query carries 0 there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class HubnessPrior(nn.Module):
    """The bank of a Fast model: its text tower's and its concept channel's embeddings of the bank
    captions (fp16 buffers, kept in the checkpoint), so the fused bank follows the concept switch."""

    def __init__(self, size: int, fast_dim: int, concept_dim: int):
        super().__init__()
        self.register_buffer("bank_fast", torch.zeros(size, fast_dim, dtype=torch.float16))
        self.register_buffer("bank_concept", torch.zeros(size, concept_dim, dtype=torch.float16))
        self._fused: tuple | None = None  # (key, fp32 bank): built once per concept setting, not per call

    @torch.no_grad()
    def set_bank(self, fast: torch.Tensor, concept: torch.Tensor | None) -> None:
        self.bank_fast.copy_(fast.to(torch.float16))
        if concept is not None and self.bank_concept.shape[1]:
            self.bank_concept.copy_(concept.to(torch.float16))

    @torch.no_grad()
    def bank(self, key, fuse) -> torch.Tensor:
        """The fp32 bank in the model's current output space: ``fuse(fast, concept)`` is the model's own
        fusion (or None when the concept channel is off), ``key`` what it depends on. Kept between calls:
        rebuilding it (6,000 x 640 from fp16) cost 8-10 ms, more than one image's whole prior. The buffers'
        storage and versions are part of the key, so new bank contents (``set_bank``, ``load_state_dict``,
        a replaced buffer) rebuild it."""
        key = (key, *((b.data_ptr(), b._version) for b in (self.bank_fast, self.bank_concept)))
        if self._fused is None or self._fused[0] != key:
            fast = self.bank_fast.float()
            self._fused = (key, fast if fuse is None else fuse(fast, self.bank_concept.float()))
        return self._fused[1]

    @staticmethod
    def log_prior(image: torch.Tensor, bank: torch.Tensor, temperature: float) -> torch.Tensor:
        """[N, D] image vectors -> [N]: T log mean_b exp(bank_b . x / T), in fp32."""
        sims = image.float() @ bank.T
        return temperature * (torch.logsumexp(sims / temperature, dim=-1) - math.log(bank.shape[0]))


def zero_prior_column(vectors, has_column: bool):
    """An image embedding used as a query (search by example): its prior column set to 0, so
    image-to-image and image-to-caption scores are the plain cosine."""
    if has_column:
        vectors = vectors.copy()
        vectors[..., -1] = 0.0
    return vectors


def combine_query_vectors(vectors, weights, has_column: bool):
    """The weighted sum of query embeddings, renormalised (rclip's compound queries). With a prior column,
    only the embedding part is summed and renormalised; the column stays 1. Returns (vector, norm)."""
    body = vectors[:, :-1] if has_column else vectors
    q = (np.asarray(weights, dtype=np.float32)[:, None] * body).sum(0)
    norm = float(np.linalg.norm(q))
    if norm < 1e-6:
        return q, norm
    q = (q / norm).astype(np.float32)
    if has_column:
        q = np.concatenate([q, np.ones(1, np.float32)])
    return q, norm

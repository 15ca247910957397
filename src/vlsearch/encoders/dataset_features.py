"""Cached features of a caption dataset as in-memory tensors for training and evaluation."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from vlsearch.data import CaptionDataset
from vlsearch.encoders.features import FeatureExtractor


@dataclass
class DatasetFeatures:
    """Features of a dataset's readable images and their captions (unreadable images are dropped)."""

    dataset: CaptionDataset
    grid: torch.Tensor  # [N,49,1280] fp16
    mid: torch.Tensor | None  # [N,196,C] fp16
    states: torch.Tensor  # [M,L,384] fp16
    lengths: torch.Tensor  # [M]
    token_ids: torch.Tensor  # [M,L]
    caption_image: torch.Tensor  # [M]

    @classmethod
    def load(
        cls,
        dataset: CaptionDataset,
        extractor: FeatureExtractor | None = None,
        mid: bool = False,
        progress: bool = True,
    ) -> DatasetFeatures:
        fx = extractor or FeatureExtractor(progress=progress)
        feats = fx.image_keys(dataset.image_paths)
        if feats.report:
            print(feats.report.summary(), file=sys.stderr)
            dataset = dataset.without_images({i for i, k in enumerate(feats.keys) if k is None})
        keys = [k for k in feats.keys if k is not None]
        grid = torch.from_numpy(fx.images.get_stacked(keys, "grid"))
        mid_t = torch.from_numpy(fx.images.get_stacked(keys, "mid")) if mid else None
        if dataset.captions:
            tkeys = fx.text_keys(dataset.captions)
            states, lengths = fx.texts.get_padded(tkeys, "states")
            ids, _ = fx.texts.get_padded(tkeys, "ids")
            states_t, lengths_t, ids_t = (
                torch.from_numpy(states),
                torch.from_numpy(lengths),
                torch.from_numpy(ids[..., 0]),
            )
        else:
            states_t, lengths_t, ids_t = (
                torch.zeros(0, 1, 384, dtype=torch.float16),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, 1, dtype=torch.int32),
            )
        return cls(
            dataset,
            grid,
            mid_t,
            states_t,
            lengths_t,
            ids_t,
            torch.from_numpy(np.asarray(dataset.caption_image)),
        )

    @property
    def n_images(self) -> int:
        return len(self.grid)

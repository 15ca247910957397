"""What the search stack may assume of a model, as typing Protocols (checked structurally, no base class).

* ``DualEncoder``: images and texts each into one space of unit vectors, apart, so a gallery is embedded
  once and indexed (Fast, fast-distilled, the decomposed deformer). Image inputs come as
  ``(grid, mid)`` everywhere: ``grid`` [B,49,1280] (the 7x7 map) first, ``mid`` [B,196,C] (14x14) second.
* ``PairScorer``: a model that scores a (text, image) pair jointly (Slow, deformer-joint). It splits the
  work by what repeats: ``image_state`` once per image (cached by the re-ranker across queries),
  ``text_state`` once per text, then ``score`` for a block of T texts x N images. One re-ranker, one
  bench row and one eval path serve any pair scorer through these three calls, and ``config`` carries
  the weights that fuse its score with a dual encoder's cosine (``fusion_weight``, ``fusion_weight_i2t``).
* ``CompactImages``: a pair scorer that can rebuild its image state from a few int8 parts (the Slow
  model), so a re-ranker can keep ~41 KB per image instead of the full maps' 169 KB.
* ``States``: what ``image_state`` and ``text_state`` return. Rows are images (texts); ``rows(idx)``
  selects some, ``stack(parts)`` joins blocks (padding texts to the longest), so a cache can keep one
  image per entry and a scorer can compute texts in length-sorted chunks, without knowing the layout.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class DualEncoder(Protocol):
    @property
    def embed_dim(self) -> int:
        """Width of what encode_image and encode_text return (the index's vector size)."""
        ...

    def encode_image(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, embed_dim] unit vectors (a Fast model with a hubness prior appends its column: the image's
        prior; models/hubness.py)."""
        ...

    def encode_text(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Cached MiniLM token states [B,L,384] and lengths [B] -> [B, embed_dim] unit vectors (with a
        hubness prior, then a column of ones)."""
        ...


@runtime_checkable
class States(Protocol):
    def rows(self, idx) -> States:
        """These rows (a slice or a LongTensor of positions), in that order."""
        ...

    @classmethod
    def stack(cls, parts: list) -> States:
        """The rows of every part, in order (texts padded to the longest; padding is masked)."""
        ...

    def __len__(self) -> int: ...


@runtime_checkable
class PairScorer(Protocol):
    is_pair_scorer: bool  # True
    config: Any  # with fusion_weight, fusion_weight_i2t

    def image_state(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> States:
        """What the model computes from N images alone (the re-ranker caches it per image)."""
        ...

    def text_state(self, states: torch.Tensor, lengths: torch.Tensor) -> States:
        """What the model computes from T texts alone."""
        ...

    def score(self, text_state: Any, image_state: Any) -> torch.Tensor:
        """[T, N] matching scores of every text against every image of the block."""
        ...


@runtime_checkable
class CompactImages(Protocol):
    """A pair scorer whose image state can be rebuilt from a few stored *parts* (encoders/compact.py):
    what a re-ranker keeps per image in ~41 KB instead of the full maps."""

    def compact_shapes(self) -> dict[str, tuple[int, int]]:
        """[tokens, dim] of each part."""
        ...

    def compact_parts(self, grid: torch.Tensor, mid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The parts of N images, [N, tokens, dim] each."""
        ...

    def image_state_from_parts(self, parts: dict[str, torch.Tensor]) -> States:
        """The image state ``image_state`` gives, from (dequantized) parts."""
        ...

    def compact_digest(self) -> str:
        """Names the store of these parts: differs for any other weights that make them."""
        ...


def is_dual_encoder(model) -> bool:
    """A model the index can embed with (a pair scorer in joint mode is not one)."""
    return isinstance(model, DualEncoder) and not getattr(model, "is_pair_scorer", False)


def is_pair_scorer(model) -> bool:
    return bool(getattr(model, "is_pair_scorer", False)) and isinstance(model, PairScorer)


def has_compact_images(model) -> bool:
    return is_pair_scorer(model) and isinstance(model, CompactImages)

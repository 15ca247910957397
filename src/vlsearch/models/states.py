"""The states pair scorers compute once and reuse (models/contracts.States): what the Slow model and
deformer-joint compute from images alone and from texts alone. Each selects rows (``rows``) and joins
blocks (``stack``, texts padded to the longest, padding masked), so a re-ranker can cache one image per
entry and score texts computed in length-sorted chunks without knowing the layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Images' cross-attention keys/values for every fusion layer: [(k, v)] each [N, heads, Lk, head_dim]; with a
# Fast prior one more pair at the end, (e, e) with e the prior's image vectors [N, D]. Every entry has the
# images on dim 0, so a cache may slice and concatenate entries without knowing which is which.
ImageKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TextState:
    """What the first fusion layer computes from a text alone: hidden states [T,L,D], mask [T,L] and the
    cross-attention queries [T,H,L,hd]."""

    h: torch.Tensor
    mask: torch.Tensor
    q: torch.Tensor
    prior: torch.Tensor | None = None  # the Fast prior's text vectors [T, D] (unit), with a prior

    def __len__(self) -> int:
        return len(self.mask)

    def rows(self, idx) -> TextState:
        prior = None if self.prior is None else self.prior[idx]
        return TextState(self.h[idx], self.mask[idx], self.q[idx], prior)

    def trimmed(self, length: int) -> TextState:
        """The first ``length`` tokens (exact when no row is longer: padded positions are masked)."""
        return TextState(self.h[:, :length], self.mask[:, :length], self.q[:, :, :length], self.prior)

    @classmethod
    def stack(cls, parts: list[TextState]) -> TextState:
        L = max(p.mask.shape[1] for p in parts)
        prior = None if parts[0].prior is None else torch.cat([p.prior for p in parts])
        return TextState(  # zeros after each text's tokens: h [T,L,D], mask [T,L], q [T,H,L,hd]
            torch.cat([F.pad(p.h, (0, 0, 0, L - p.h.shape[1])) for p in parts]),
            torch.cat([F.pad(p.mask, (0, L - p.mask.shape[1])) for p in parts]),
            torch.cat([F.pad(p.q, (0, 0, 0, L - p.q.shape[2])) for p in parts]),
            prior,
        )


@dataclass
class SlowImageState:
    """The PairScorer image state of N images (images on dim 0 of every tensor): the image ``tokens``
    [N, Lk, D] every cross-attention reads, the Fast prior's image vectors [N, E] (with a prior), and
    ``kv``, the fusion layers' keys/values (ImageKV), which the model computes from the tokens the first
    time a block of many texts needs them and keeps here. One text needs none: its queries go through the
    key and value weights instead (``SlowModel.score``), 5x less work for a re-ranked query."""

    tokens: torch.Tensor
    prior: torch.Tensor | None = None
    kv: ImageKV | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, idx) -> SlowImageState:
        prior = None if self.prior is None else self.prior[idx]
        kv = None if self.kv is None else [(k[idx], v[idx]) for k, v in self.kv]
        return SlowImageState(self.tokens[idx], prior, kv)

    @classmethod
    def stack(cls, parts: list[SlowImageState]) -> SlowImageState:
        prior = None if parts[0].prior is None else torch.cat([p.prior for p in parts])
        kv = None
        if all(p.kv is not None for p in parts):
            kv = [
                (torch.cat([p.kv[j][0] for p in parts]), torch.cat([p.kv[j][1] for p in parts]))
                for j in range(len(parts[0].kv))
            ]
        return cls(torch.cat([p.tokens for p in parts]), prior, kv)


@dataclass
class ImageTokens:
    """What the model reads from images: tokens [N, Ni, D], the image tower's embedding [N, E] (or
    None without a tower) and the concept vectors [N, 384] (or None without the channel). Indexing
    selects images."""

    tokens: torch.Tensor
    tower: torch.Tensor | None = None
    concept: torch.Tensor | None = None

    def __getitem__(self, idx) -> ImageTokens:
        return ImageTokens(self.tokens[idx], _rows(self.tower, idx), _rows(self.concept, idx))

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, idx) -> ImageTokens:
        return self[idx]

    @classmethod
    def stack(cls, parts: list[ImageTokens]) -> ImageTokens:
        return cls(
            torch.cat([p.tokens for p in parts]),
            _cat([p.tower for p in parts]),
            _cat([p.concept for p in parts]),
        )


@dataclass
class TextTokens:
    """The PairScorer text state: text tokens [T, L, D], their mask [T, L] (True = real token) and the
    concept-space query vectors [T, 384] (or None without the channel)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    concept: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.mask)

    def rows(self, idx) -> TextTokens:
        return TextTokens(self.tokens[idx], self.mask[idx], _rows(self.concept, idx))

    @classmethod
    def stack(cls, parts: list[TextTokens]) -> TextTokens:
        L = max(p.mask.shape[1] for p in parts)
        tokens = [F.pad(p.tokens, (0, 0, 0, L - p.tokens.shape[1])) for p in parts]
        masks = [F.pad(p.mask, (0, L - p.mask.shape[1])) for p in parts]
        return cls(torch.cat(tokens), torch.cat(masks), _cat([p.concept for p in parts]))


def _rows(x: torch.Tensor | None, idx) -> torch.Tensor | None:
    return None if x is None else x[idx]


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)

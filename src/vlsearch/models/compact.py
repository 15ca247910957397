"""A pair scorer seen through the compact store (encoders/compact.py): its images' parts go through the
store's int8 round trip before the image state is built. Offline evaluation (`vlsearch eval --rerank K
--rerank-features compact`) scores with it, so the recall it reports is what a re-ranker reading the
compact store gets; the online re-ranker reads the store itself (search/rerank.py)."""

from __future__ import annotations

import torch

from vlsearch.encoders.compact import part_bytes, round_trip
from vlsearch.errors import CheckpointError
from vlsearch.models.contracts import has_compact_images


class CompactScorer:
    """The PairScorer contract, delegated, with ``image_state`` rebuilt from round-tripped parts."""

    is_pair_scorer = True

    def __init__(self, model):
        if not has_compact_images(model):
            kind = getattr(model, "model_type", type(model).__name__)
            raise CheckpointError(f"a {kind!r} model cannot read compact features: re-rank it with full ones")
        self.model = model
        self.config = model.config
        self.model_type = f"{model.model_type}-compact"

    @property
    def bytes_per_image(self) -> int:
        return part_bytes(self.model.compact_shapes())

    @torch.no_grad()
    def image_state(self, grid, mid=None):
        parts = self.model.compact_parts(grid, mid)
        back = {n: torch.from_numpy(round_trip(p.float().numpy())) for n, p in parts.items()}
        return self.model.image_state_from_parts(back)

    def text_state(self, states, lengths):
        return self.model.text_state(states, lengths)

    def score(self, text_state, image_state):
        return self.model.score(text_state, image_state)

    def eval(self):
        self.model.eval()
        return self

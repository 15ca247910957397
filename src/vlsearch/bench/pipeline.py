"""The query path the bench times: a real ``SearchEngine`` (text in, ids out) with a Slow re-ranker.

The re-ranker is the project's ``vlsearch.search.rerank.Reranker`` when that module exists; otherwise an
equivalent one here (Fast top-K -> the K images' cached features from the memory-mapped feature store ->
``SlowModel.score_texts_images`` -> fused score), plugged into the same engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.search.rerank import Reranker


class BenchReranker:
    """``rerank_text(text, keys, fast_scores, explain) -> (fused, slow, explanations)``, as the engine calls it."""

    def __init__(self, model, extractor):
        self.model, self.extractor = model, extractor
        cfg = model.config
        self.weight = float(getattr(cfg, "fusion_weight", 0.0) or 1.0)
        self.use_grid = bool(getattr(cfg, "use_grid", True))

    @torch.no_grad()
    def rerank_text(self, text: str, keys: list[str], fast_scores: np.ndarray, explain: bool = False):
        states, lengths, _ = self.extractor.encode_texts([text])
        store = self.extractor.images
        mid = torch.from_numpy(store.get_stacked(keys, "mid")).float()
        grid = torch.from_numpy(store.get_stacked(keys, "grid")).float()
        slow = (
            self.model.score_texts_images(
                torch.from_numpy(states).float(),
                torch.from_numpy(lengths),
                mid,
                grid if self.use_grid else None,
            )
            .reshape(-1)
            .float()
            .numpy()
        )
        return np.asarray(fast_scores) + self.weight * slow, slow, None


def make_reranker(slow, extractor, work: Path) -> tuple[object | None, str]:
    """(re-ranker or None, what it is). ``slow`` is a bench.models.OurModel."""
    if not slow.available:
        return None, slow.source
    try:
        if slow.source.startswith("checkpoint "):
            path = Path(slow.source.split(" ", 1)[1])
        else:
            path = save_checkpoint(work / "slow-random-weights", slow.model)
        reranker = Reranker.load(path, extractor=extractor)
        if getattr(reranker, "extractor", None) is None:
            reranker.extractor = extractor
        _smoke(reranker, extractor)
        return reranker, f"vlsearch.search.rerank.Reranker ({slow.source})"
    except Exception as e:  # noqa: BLE001 - a module being written may not work yet: fall back
        note = f"vlsearch.search.rerank.Reranker failed ({type(e).__name__}: {e})"
    reranker = BenchReranker(slow.model, extractor)
    try:
        _smoke(reranker, extractor)
    except Exception as e:  # noqa: BLE001
        return None, f"not available (SlowModel.score_texts_images failed: {type(e).__name__}: {e})"
    return reranker, f"bench re-ranker: Fast top-K + SlowModel.score_texts_images ({note}; {slow.source})"


def _smoke(reranker, extractor) -> None:
    keys = extractor.images._db.execute("SELECT key FROM items LIMIT 3").fetchall()
    keys = [k for (k,) in keys]
    fused, slow, _ = reranker.rerank_text("a dog runs on the grass", keys, np.zeros(len(keys), np.float32))
    if len(np.asarray(fused)) != len(keys):
        raise ValueError("re-ranker returned the wrong number of scores")

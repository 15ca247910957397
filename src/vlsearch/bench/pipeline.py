"""The query path the bench times: a real ``SearchEngine`` (text in, ids out) with the project's one
re-ranker, ``vlsearch.search.rerank.Reranker``, driving the bench's pair scorer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlsearch.models.checkpoint import save_checkpoint
from vlsearch.search.rerank import Reranker


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
        _smoke(reranker, extractor)
    except Exception as e:  # noqa: BLE001 - the bench reports a broken re-ranker as a row, not a crash
        return None, f"not available (vlsearch.search.rerank.Reranker failed: {type(e).__name__}: {e})"
    return reranker, f"vlsearch.search.rerank.Reranker ({slow.source})"


def _smoke(reranker, extractor) -> None:
    keys = extractor.images.sample_keys(3)
    fused, slow, _ = reranker.rerank_text("a dog runs on the grass", keys, np.zeros(len(keys), np.float32))
    if len(np.asarray(fused)) != len(keys):
        raise ValueError("re-ranker returned the wrong number of scores")

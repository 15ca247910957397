"""The search engine a user holds: an index, the dual encoder it was built with, and an optional re-ranker."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlsearch.errors import IndexError_, QueryError
from vlsearch.index.gallery import GalleryIndex
from vlsearch.models.fast import set_concepts
from vlsearch.models.registry import fingerprint, load_model, resolve_checkpoint
from vlsearch.search.embedder import Embedder, check_query
from vlsearch.settings import default_index_dir

MAX_K = 1000
MAX_RERANK = 200


@dataclass
class Hit:
    row: int
    id: str
    path: str
    score: float
    fast_score: float | None = None
    slow_score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionHit:
    row: int
    text: str
    image_row: int
    score: float


@dataclass
class SearchResult:
    hits: list
    timings_ms: dict = field(default_factory=dict)
    explanations: list | None = None


def check_k(k, limit: int = MAX_K, name: str = "k") -> int:
    try:
        k = int(k)
    except (TypeError, ValueError) as e:
        raise QueryError(f"{name} must be a whole number") from e
    if k < 1 or k > limit:
        raise QueryError(f"{name} must be between 1 and {limit}, not {k}")
    return k


class SearchEngine:
    def __init__(self, index: GalleryIndex, embedder: Embedder, reranker=None):
        self.index, self.embedder, self.reranker = index, embedder, reranker
        self._mtime = self._config_mtime()
        # Load the text backbone now, so the first query's latency is a query's, not a model load's.
        _ = self.embedder.extractor.text_backbone

    @classmethod
    def open(cls, index_dir=None, model=None, rerank_model=None, progress: bool = False) -> SearchEngine:
        index = GalleryIndex.open(index_dir or default_index_dir())
        name = model or index.config.model
        net, meta, ckpt = load_model(name)
        if (
            meta["model_type"] != index.config.model_type
            or fingerprint(ckpt) != index.config.model_fingerprint
        ):
            raise IndexError_(
                f"index {index.path} was built with model {index.config.model!r} ({index.config.model_fingerprint}), "
                f"not {name!r} ({fingerprint(ckpt)}): rebuild it with `vlsearch index --model {name}`"
            )
        reranker = None
        if rerank_model:
            from vlsearch.search.rerank import Reranker

            reranker = Reranker.load(resolve_checkpoint(rerank_model), extractor=None)
        set_concepts(net, getattr(index.config, "concepts", True))  # as the index was built
        engine = cls(index, Embedder(net, progress=progress), reranker)
        if reranker is not None:
            reranker.extractor = engine.embedder.extractor
        return engine

    # -- freshness: an index rewritten on disk (vlsearch index --add, POST /images) is picked up ----------
    def _config_mtime(self) -> float:
        try:
            return (self.index.path / "config.json").stat().st_mtime
        except OSError:
            return 0.0

    def refresh(self) -> bool:
        mtime = self._config_mtime()
        if mtime != self._mtime:
            self.index = GalleryIndex.open(self.index.path)
            self._mtime = mtime
            return True
        return False

    # -- queries ------------------------------------------------------------------------------------------
    def search(self, text, k: int = 10, rerank: int = 0, explain: bool = False) -> SearchResult:
        """Text-to-image: Fast top-k, or Fast top-``rerank`` rescored by the Slow model, cut to k."""
        text = check_query(text)
        k = check_k(k)
        rerank = check_k(rerank, MAX_RERANK, "rerank") if rerank else 0
        if rerank and self.reranker is None:
            raise QueryError("re-ranking needs a Slow model: open the engine with rerank_model='slow'")
        t0 = time.perf_counter()
        q = self.embedder.embed_query(text)
        t1 = time.perf_counter()
        scores, rows = self.index.images.search(q[None], max(k, rerank))
        scores, rows = scores[0], rows[0]
        keep = rows >= 0
        scores, rows = scores[keep], rows[keep]
        t2 = time.perf_counter()
        timings = {"encode": (t1 - t0) * 1e3, "retrieve": (t2 - t1) * 1e3}
        records = self.index.records(rows)
        explanations = None
        if rerank:
            fused, slow, explanations = self.reranker.rerank_text(
                text, [r.key for r in records], scores, explain=explain
            )
            order = np.argsort(-fused, kind="stable")[:k]
            hits = [
                Hit(
                    int(rows[i]),
                    records[i].id,
                    records[i].path,
                    float(fused[i]),
                    float(scores[i]),
                    float(slow[i]),
                )
                for i in order
            ]
            if explanations is not None:
                explanations = [explanations[i] for i in order]
            timings["rerank"] = (time.perf_counter() - t2) * 1e3
        else:
            hits = [
                Hit(int(r), rec.id, rec.path, float(s), float(s))
                for r, rec, s in zip(rows[:k], records[:k], scores[:k], strict=True)
            ]
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return SearchResult(hits, timings, explanations)

    def search_image(self, image, k: int = 10) -> SearchResult:
        """Image-to-image; ``captions_for_image`` gives image-to-text."""
        k = check_k(k)
        t0 = time.perf_counter()
        q = self.embedder.embed_image(image)
        scores, rows = self.index.images.search(q[None], k)
        keep = rows[0] >= 0
        records = self.index.records(rows[0][keep])
        hits = [
            Hit(int(r), rec.id, rec.path, float(s), float(s))
            for r, rec, s in zip(rows[0][keep], records, scores[0][keep], strict=True)
        ]
        return SearchResult(hits, {"total": (time.perf_counter() - t0) * 1e3})

    def captions_for_image(self, image, k: int = 5) -> SearchResult:
        k = check_k(k)
        if self.index.captions is None or len(self.index.captions) == 0:
            return SearchResult([], {})
        t0 = time.perf_counter()
        q = self.embedder.embed_image(image)
        scores, rows = self.index.captions.search(q[None], k)
        keep = rows[0] >= 0
        caps = self.index.caption_rows(rows[0][keep])
        hits = [
            CaptionHit(int(r), t, int(i), float(s))
            for r, (t, i), s in zip(rows[0][keep], caps, scores[0][keep], strict=True)
        ]
        return SearchResult(hits, {"total": (time.perf_counter() - t0) * 1e3})

    def add(self, paths) -> int:
        from vlsearch.index.build import add_to_index

        n, report = add_to_index(self.index.path, paths, progress=False)
        self.refresh()
        return n

    @property
    def path(self) -> Path:
        return self.index.path

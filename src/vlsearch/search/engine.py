"""The search engine a user holds: an index, the dual encoder it was built with, and an optional re-ranker."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from vlsearch.errors import IndexError_, QueryError
from vlsearch.index.build import add_to_index
from vlsearch.index.gallery import GalleryIndex
from vlsearch.index.photos import PhotoFilter, search_filtered
from vlsearch.models.embedder import Embedder, check_query
from vlsearch.models.fast import set_concepts, set_hubness
from vlsearch.models.registry import fingerprint, load_model, resolve_checkpoint
from vlsearch.search import queries as Q
from vlsearch.search import video_engine
from vlsearch.search.rerank import Reranker
from vlsearch.search.results import (  # noqa: F401 - re-exported: callers import them from here
    MAX_DEPTH,
    MAX_K,
    MAX_RERANK,
    CaptionHit,
    Hit,
    SearchResult,
    check_k,
)
from vlsearch.settings import default_index_dir


class SearchEngine:
    def __init__(self, index: GalleryIndex, embedder: Embedder, reranker=None):
        self.index, self.embedder, self.reranker = index, embedder, reranker
        self._mtime = self._config_mtime()
        # Load the text backbone now, so the first query's latency is a query's, not a model load's.
        _ = self.embedder.extractor.text_backbone

    @classmethod
    def open(
        cls, index_dir=None, model=None, rerank_model=None, progress: bool = False, rerank_compact=False
    ) -> SearchEngine:
        """``rerank_compact``: the re-ranker reads compact image parts (search/rerank.py)."""
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
            reranker = Reranker.load(resolve_checkpoint(rerank_model), extractor=None, compact=rerank_compact)
        set_concepts(net, getattr(index.config, "concepts", True))  # as the index was built
        set_hubness(net, getattr(index.config, "hubness", True))
        engine = cls(index, Embedder(net, progress=progress), reranker)
        if reranker is not None:
            reranker.extractor = engine.embedder.extractor
        return engine

    # -- freshness: an index rewritten on disk (vlsearch index --add, POST /images) is picked up ----------
    def _config_mtime(self):
        try:
            st = (self.index.path / "config.json").stat()  # the manifest: replaced by every write
            return (st.st_ino, st.st_mtime_ns)
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
    def search(
        self,
        text,
        k: int = 10,
        rerank: int = 0,
        explain: bool = False,
        *,
        filters: PhotoFilter | None = None,
        after=None,
        before=None,
        folder=None,
        camera=None,
        near=None,
        sort: str = "score",
        offset: int = 0,
        cursor: str | None = None,
        min_score=None,
    ) -> SearchResult:
        """Text-to-image: Fast top-k, or Fast top-``rerank`` rescored by the Slow model, cut to k.

        ``text`` may be compound (``"beach -people"``, ``"2:dog 1:snow"``: search/queries.py). Filters
        (``after``/``before`` dates, ``folder`` prefix, ``camera`` text, ``near`` "lat,lon,km", or a
        ready ``filters``) run inside retrieval, so k results come back whenever k images match.
        ``sort="date"`` orders the best ``MAX_K`` matches newest first; ``offset`` or ``cursor`` (the
        result's ``next_cursor``) page; ``min_score`` drops results below that cosine.
        """
        text = check_query(text)
        k = check_k(k)
        rerank = check_k(rerank, MAX_RERANK, "rerank") if rerank else 0
        if rerank and self.reranker is None:
            raise QueryError("re-ranking needs a Slow model: open the engine with rerank_model='slow'")
        terms = Q.parse_query(text)
        if rerank and Q.is_compound(terms):
            raise QueryError("re-ranking takes a plain query, not weighted or subtracted terms")
        f = filters if filters is not None else Q.make_filter(after, before, folder, camera, near)
        sort, min_score = Q.check_sort(sort), Q.check_min_score(min_score)
        fp = Q.query_fingerprint(text, f, sort, min_score)
        offset = Q.read_cursor(cursor, fp) if cursor else Q.check_offset(offset)
        if offset + k > MAX_DEPTH:
            raise QueryError(f"paging goes {MAX_DEPTH} results deep at most (offset {offset} + k {k})")
        rr_pool = max(k, rerank) if rerank else 0  # the Slow model rescores these, the same on every page
        if rerank and offset + k > rr_pool:
            raise QueryError(
                f"with rerank {rerank} and k {k}, pages reach {rr_pool} results deep (offset + k)"
            )
        if self.has_videos:  # photos and videos ranked together, one hit per video
            if f or sort != "score" or min_score is not None or offset or Q.is_compound(terms):
                raise QueryError(
                    "filters, date sort, paging, min-score and compound queries do not yet apply to an index"
                    " that holds videos; search it with a plain query"
                )
            return video_engine.search(self, text, k, rerank=rerank, explain=explain)
        t0 = time.perf_counter()
        q = self.embed_terms(terms)
        t1 = time.perf_counter()
        # one more than the page, to know whether another page follows
        pool = max(MAX_K, offset + k + 1) if sort == "date" else max(offset + k + 1, rr_pool)
        allowed = self.index.filter_rows(f) if f else None
        if allowed is None:
            scores, rows = self.index.images.search(q[None], pool)
            scores, rows = scores[0], rows[0]
            keep = rows >= 0
            scores, rows = scores[keep], rows[keep]
        else:
            scores, rows = search_filtered(self.index.images, self.index.embeddings, q, pool, allowed)
        order = np.lexsort((rows, -scores))  # ties by row: pages never repeat or skip an image
        scores, rows = scores[order], rows[order]
        t2 = time.perf_counter()
        timings = {"encode": (t1 - t0) * 1e3, "retrieve": (t2 - t1) * 1e3}
        explanations = None
        fast = scores
        slow = None
        if rerank:
            records = self.index.records(rows[:rr_pool])
            fused, slow_s, explanations = self.reranker.rerank_text(
                text, [r.key for r in records], scores[:rr_pool], explain=explain
            )
            order = np.argsort(-fused, kind="stable")
            rows, scores, fast, slow = rows[order], fused[order], scores[order], slow_s[order]
            if explanations is not None:
                explanations = [explanations[i] for i in order]
            timings["rerank"] = (time.perf_counter() - t2) * 1e3
        if min_score is not None:
            keep = scores >= min_score
            rows, scores, fast = rows[keep], scores[keep], fast[keep]
            slow = slow[keep] if slow is not None else None
            if explanations is not None:
                explanations = [e for e, ok in zip(explanations, keep, strict=True) if ok]
        photos = self.index.photos(rows if sort == "date" else rows[offset : offset + k])
        if sort == "date":
            taken = np.array(
                [-(photos[r].taken or -np.inf) if r in photos else np.inf for r in rows.tolist()]
            )
            order = np.lexsort((rows, -scores, taken))
            rows, scores, fast = rows[order], scores[order], fast[order]
            slow = slow[order] if slow is not None else None
        page = slice(offset, offset + k)
        more = len(rows) > offset + k
        records = self.index.records(rows[page])
        hits = []
        for i, (r, rec) in enumerate(zip(rows[page].tolist(), records, strict=True)):
            n = offset + i
            meta = photos.get(r)
            hits.append(
                Hit(
                    r,
                    rec.id,
                    rec.path,
                    float(scores[n]),
                    float(fast[n]),
                    float(slow[n]) if slow is not None else None,
                    taken=meta.taken if meta else None,
                    folder=meta.folder if meta else None,
                    camera=(meta.camera or None) if meta else None,
                )
            )
        if explanations is not None:
            explanations = explanations[page]
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return SearchResult(
            hits,
            timings,
            explanations,
            offset=offset,
            next_offset=offset + k if more else None,
            next_cursor=Q.make_cursor(offset + k, fp) if more else None,
            n_matching=len(allowed) if allowed is not None else len(self.index.images),
        )

    def embed_terms(self, terms: list[Q.Term]) -> np.ndarray:
        """One query vector: the weighted sum of the terms' embeddings, renormalised (rclip's way)."""
        if not Q.is_compound(terms):
            return self.embedder.embed_query(terms[0].text)
        emb = self.embedder.embed_texts([t.text for t in terms], cached=False)
        q, norm = self.embedder.combine_queries(emb, [t.weight for t in terms])
        if norm < 1e-6:
            raise QueryError("the query's terms cancel out: nothing is left to search for")
        return q

    def search_image(self, image, k: int = 10) -> SearchResult:
        """Image-to-image; ``captions_for_image`` gives image-to-text."""
        k = check_k(k)
        if self.has_videos:
            return video_engine.search(self, image, k, by_image=True)
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
        n, report = add_to_index(self.index.path, paths, progress=False)
        self.refresh()
        return n

    def remove(self, ids) -> list[str]:
        """Delete images by id (tombstones in the index's manifest); returns the ids that were there."""
        from vlsearch.index.update import remove_ids

        removed = remove_ids(self.index.path, [ids] if isinstance(ids, str) else list(ids))
        self.refresh()
        return removed

    @property
    def path(self) -> Path:
        return self.index.path

    # -- videos (vlsearch.search.video_engine) --------------------------------------------------------------
    @property
    def has_videos(self) -> bool:
        return video_engine.layout(self).n_videos > 0

    def search_videos(self, query, k: int = 10, rerank: int = 0, aggregate: str | None = None):
        """Text (or, with an image/path, image) to video: videos only, each with its best moment."""
        return video_engine.search_videos(self, query, k, rerank=rerank, aggregate=aggregate)

    def search_moments(self, query, k: int = 10, by_image: bool = False):
        """Moments across all videos (temporal localisation), by text or by a photo."""
        return video_engine.search_moments(self, query, k, by_image=by_image)

    def captions_for_video(self, video_id: str, k: int = 5):
        """Video-to-text: the index's captions that match a video."""
        return video_engine.captions_for_video(self, video_id, k)

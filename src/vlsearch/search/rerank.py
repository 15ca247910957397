"""Online re-ranking: a pair scorer (``models/contracts.PairScorer``: the Slow model, deformer-joint)
rescores one query's dual-encoder top-K, and the two scores are fused (``search/fusion.py``).

Image states are computed from the feature cache by content key and memoised (LRU), so a gallery image
that comes back in many queries' top-K costs its image state once. Offline scoring of whole splits is
``search/pair_scoring.py``; what re-ranking costs is ``search/rerank_cost.py``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vlsearch.encoders.features import FeatureExtractor
from vlsearch.errors import CheckpointError, QueryError
from vlsearch.models.contracts import is_pair_scorer
from vlsearch.models.registry import load_model
from vlsearch.precision import autocast, inference_copy
from vlsearch.search.explain import word_maps


class Reranker:
    """Rescores a query's candidates with any pair scorer; images come from the feature cache by key."""

    def __init__(self, model, meta: dict | None = None, path=None, extractor=None, cache_images=2048):
        if not is_pair_scorer(model):
            kind = getattr(model, "model_type", type(model).__name__)
            raise CheckpointError(
                f"{path or 'this model'}: a {kind!r} model, not a pair scorer: re-rank with a Slow or "
                "deformer-joint checkpoint (`--rerank-model slow` or `deformer-joint`)"
            )
        self.model = inference_copy(model)
        self.meta = meta or {}
        self.path = Path(path) if path else None
        self.extractor = extractor
        self._states: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # the memo is shared by the service's worker threads
        self.cache_images = cache_images
        # keys -> image files, for features the cache lost (pruned, another VLSEARCH_HOME, built elsewhere)
        self.locate: Callable[[list[str]], dict[str, str]] | None = None

    @classmethod
    def load(cls, checkpoint_path, extractor=None) -> Reranker:
        """Any pair-scorer checkpoint (a name or a folder): `slow`, `deformer-joint`."""
        model, meta, path = load_model(checkpoint_path)
        return cls(model, meta, path, extractor)

    @property
    def can_explain(self) -> bool:
        """Whether the model has word-to-region maps (the Slow model's cross-attention)."""
        return hasattr(self.model, "score_with_maps")

    def _need_extractor(self):
        if self.extractor is None:
            self.extractor = FeatureExtractor(progress=False)
        return self.extractor

    @torch.no_grad()
    def image_states(self, keys: list[str]):
        """The model's image state of these cached images, in order, memoised per content key (LRU).
        Thread-safe: the service's workers share one re-ranker (the pair scoring itself runs in parallel)."""
        with self._lock:
            return self._image_states(keys)

    def _image_states(self, keys: list[str]):
        todo = list(dict.fromkeys(k for k in keys if k not in self._states))
        if todo:
            store = self._need_extractor().images
            grid = torch.from_numpy(store.get_stacked(todo, "grid"))
            mid = torch.from_numpy(store.get_stacked(todo, "mid"))
            with autocast():
                state = self.model.image_state(grid, mid)
            for i, key in enumerate(todo):
                self._states[key] = state.rows(slice(i, i + 1))
        for key in keys:
            self._states.move_to_end(key)
        parts = [self._states[key] for key in keys]
        while len(self._states) > self.cache_images:
            self._states.popitem(last=False)
        return type(parts[0]).stack(parts) if parts else None

    def forget(self) -> None:
        """Empty the per-image memo (a cold start: the bench's large-gallery rows, where candidates rarely
        repeat across queries)."""
        with self._lock:
            self._states.clear()

    def unavailable(self, keys: list[str]) -> set[str]:
        """Keys whose features are neither memoised nor cached, after recomputing what can be from the
        image files (``locate``); what is left has no file (or a changed one) and cannot be re-ranked."""
        fx = self._need_extractor()
        lost = set(fx.images.missing([k for k in dict.fromkeys(keys) if k not in self._states]))
        if lost and self.locate is not None:
            paths = self.locate(sorted(lost))
            found = fx.image_keys([paths[k] for k in sorted(lost) if k in paths]).keys
            lost -= set(k for k in found if k)
        return lost

    @torch.no_grad()
    def rerank_text(self, text: str, keys: list[str], fast_scores, explain: bool = False):
        """(fused [K], pair scores [K], explanations or None) for one text query and its K candidate
        images. A candidate whose features cannot be had keeps its Fast score, with a NaN pair score (and
        no explanation)."""
        if explain and not self.can_explain:
            raise QueryError(
                f"explanations need word-to-region maps, which the {self.model.model_type!r} re-ranker "
                "has none of: explain with the Slow model (`--rerank-model slow`)"
            )
        fast_scores = np.asarray(fast_scores, dtype=np.float32)
        if len(keys) == 0:
            return fast_scores.copy(), np.zeros(0, np.float32), ([] if explain else None)
        lost = self.unavailable(list(keys))
        if lost:
            ok = [i for i, k in enumerate(keys) if k not in lost]
            fused = fast_scores.copy()
            slow = np.full(len(keys), np.nan, np.float32)
            expl = [None] * len(keys) if explain else None
            if ok:
                f, s, e = self.rerank_text(text, [keys[i] for i in ok], fast_scores[ok], explain)
                fused[ok], slow[ok] = f, s
                for j, i in enumerate(ok):
                    if expl is not None:
                        expl[i] = e[j]
            return fused, slow, expl
        fx = self._need_extractor()
        states, lengths, ids = fx.encode_texts([text])
        image = self.image_states(list(keys))
        with autocast():
            tstate = self.model.text_state(torch.from_numpy(states), torch.from_numpy(lengths))
            if explain:
                scores, maps = self.model.score_with_maps(tstate, image)
            else:
                scores = self.model.score(tstate, image)
        slow = scores[0].float().numpy()
        fused = fast_scores + float(self.model.config.fusion_weight) * slow
        explanations = None
        if explain:
            tokens = fx.text_backbone.tokenizer.convert_ids_to_tokens(ids[0][: int(lengths[0])].tolist())
            side = self.model.config.mid_side
            explanations = [word_maps(tokens, maps[0, i].numpy(), side) for i in range(len(keys))]
        return fused, slow, explanations

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

from vlsearch.encoders.compact import compact_store, get_parts, put_parts
from vlsearch.encoders.features import FeatureExtractor
from vlsearch.errors import CheckpointError, QueryError
from vlsearch.models.contracts import has_compact_images, is_pair_scorer
from vlsearch.models.registry import load_model
from vlsearch.precision import autocast, inference_copy, use_bf16
from vlsearch.search.explain import word_maps


class Reranker:
    """Rescores a query's candidates with any pair scorer; images come from the feature cache by key."""

    def __init__(
        self, model, meta: dict | None = None, path=None, extractor=None, cache_images=2048, compact=False
    ):
        """``compact``: read each image's int8 parts from a compact store (encoders/compact.py, ~41 KB per
        image) instead of the full maps; an image the store lacks is encoded into it once."""
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
        if compact and not has_compact_images(model):
            raise CheckpointError(
                f"{path or 'this model'}: a {model.model_type!r} model has no compact features"
            )
        self.compact = bool(compact)
        # named by the checkpoint's own weights (the inference copy may hold them in bf16) and by the
        # precision the copy computes the parts in, as the feature cache's folders are
        self._compact_digest = None
        if self.compact:
            self._compact_digest = model.compact_digest() + ("-bf16" if use_bf16() else "")
        self._compact_store = None
        # keys -> image files, for features the cache lost (pruned, another VLSEARCH_HOME, built elsewhere)
        self.locate: Callable[[list[str]], dict[str, str]] | None = None

    @classmethod
    def load(cls, checkpoint_path, extractor=None, compact: bool = False) -> Reranker:
        """Any pair-scorer checkpoint (a name or a folder): `slow`, `deformer-joint`."""
        model, meta, path = load_model(checkpoint_path)
        return cls(model, meta, path, extractor, compact=compact)

    def compact_store(self):
        """The store of this model's compact image parts, beside the full feature cache (or None)."""
        if not self.compact:
            return None
        if self._compact_store is None:
            full = self._need_extractor().images
            self._compact_store = compact_store(
                full.root,
                self.model.compact_shapes(),
                self._compact_digest,
                {"model_type": self.model.model_type, "full": full.root.name},
            )
        return self._compact_store

    def _full_maps(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        store = self._need_extractor().images
        return torch.from_numpy(store.get_stacked(keys, "grid")), torch.from_numpy(
            store.get_stacked(keys, "mid")
        )

    def fill_compact(self, keys: list[str]) -> int:
        """Encode the keys the compact store lacks (from the full cache); returns how many."""
        store = self.compact_store()
        todo = store.missing(list(keys))
        for s in range(0, len(todo), 256):
            part = todo[s : s + 256]
            with autocast():
                parts = self.model.compact_parts(*self._full_maps(part))
            put_parts(store, part, {n: p.float().numpy() for n, p in parts.items()})
        return len(todo)

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
            if self.compact:
                self.fill_compact(todo)
                names = self.model.compact_shapes()
                parts = get_parts(self.compact_store(), todo, names)
                with autocast():
                    state = self.model.image_state_from_parts(
                        {n: torch.from_numpy(p) for n, p in parts.items()}
                    )
            else:
                with autocast():
                    state = self.model.image_state(*self._full_maps(todo))
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
        if lost and self.compact:
            lost = set(self.compact_store().missing(sorted(lost)))
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

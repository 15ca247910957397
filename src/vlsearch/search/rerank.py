"""Re-ranking with the Slow model: it rescores the Fast model's top-K, and the two scores are fused.

fused = fast_cosine + w * slow_score, with ``w`` chosen on dev after training and saved in the Slow
checkpoint's config (``fusion_weight`` for text-to-image, ``fusion_weight_i2t`` for image-to-text).

Also the batch scorers behind `vlsearch eval --model slow` (``score_all_pairs``) and
`vlsearch eval --rerank K` (``rerank_eval``), which report what re-ranking costs per query next to what the
Slow model alone would cost over the whole gallery.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlsearch.models.slow import ImageKV, SlowModel, TextState
from vlsearch.precision import autocast, compute_dtype, inference_copy

IMAGE_CHUNK = 16  # images per score_block call
TEXT_CHUNK = 128  # texts per score_block call


def _bar(total: int, desc: str, progress: bool):
    return tqdm(
        total=total, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True, unit="pair"
    )


def _grid_or_none(model: SlowModel, grid: torch.Tensor | None) -> torch.Tensor | None:
    return grid if getattr(model.config, "use_grid", True) else None


def _generic(model) -> bool:
    """Pair scorers other than the Slow model (the joint deformer) have no text/image split to reuse:
    they are driven through ``score_texts_images(states, lengths, mid, grid, text_index, image_index)``."""
    return not isinstance(model, SlowModel)


@torch.no_grad()
def _score_all_pairs_generic(model, feats, progress: bool) -> np.ndarray:
    M, N = len(feats.states), feats.n_images
    sim = np.zeros((M, N), dtype=np.float32)
    order = np.argsort(feats.lengths.numpy(), kind="stable")  # similar lengths share a chunk
    bar = _bar(M * N, f"{type(model).__name__}: all pairs", progress)
    for s in range(0, M, TEXT_CHUNK):
        rows = torch.as_tensor(order[s : s + TEXT_CHUNK])
        L = max(1, int(feats.lengths[rows].max()))
        scores = model.score_texts_images(feats.states[rows, :L], feats.lengths[rows], feats.mid, feats.grid)
        sim[rows.numpy()] = scores.float().numpy()
        bar.update(len(rows) * N)
    bar.close()
    return sim


@torch.no_grad()
def _measure_costs_generic(model, feats, K: int, n_queries: int = 8, gallery_sample: int = 256) -> dict:
    """``measure_costs`` for a generic pair scorer: K pairs per re-ranked query, and the gallery
    extrapolated from ``gallery_sample`` images per query (one forward pass per pair: linear)."""
    N, M = feats.n_images, len(feats.states)
    rng = np.random.default_rng(0)
    queries = rng.choice(M, size=min(n_queries, M), replace=False)
    K = min(K, N)

    def one(q, imgs) -> float:
        L = max(1, int(feats.lengths[q]))
        t0 = time.perf_counter()
        model.score_texts_images(
            feats.states[q : q + 1, :L], feats.lengths[q : q + 1], feats.mid[imgs], feats.grid[imgs]
        )
        return time.perf_counter() - t0

    rerank = [one(q, torch.as_tensor(rng.choice(N, size=K, replace=False))) for q in queries][1:]
    S = min(gallery_sample, N)
    sample = torch.as_tensor(rng.choice(N, size=S, replace=False))
    gallery = [one(q, sample) for q in queries[: max(2, n_queries // 2)]]
    per_pair = float(np.median(gallery)) / S
    ms = 1e3 * float(np.median(rerank or [one(queries[0], sample[:K])]))
    return {
        "rerank_k": K,
        "slow_pairs_per_query": K,
        "rerank_ms_per_query": ms,
        "rerank_ms_per_query_cached_images": ms,
        "slow_alone_pairs_per_query": N,
        "slow_alone_ms_per_query_gallery": 1e3 * per_pair * N,
        "slow_alone_note": f"extrapolated to {N} images from {S} sampled images x {len(gallery)} queries",
        "slow_compute_ratio_pairs": N / K,
    }


def subset_text(text: TextState, rows: torch.Tensor, round_to: int = 1) -> TextState:
    """Rows of a TextState, trimmed to their longest text (exact: padded positions are masked); with
    ``round_to`` the length is rounded up so that repeated calls see few distinct shapes."""
    mask = text.mask.index_select(0, rows)
    L = max(1, int(mask.sum(1).max()))
    L = min(text.mask.shape[1], -(-L // round_to) * round_to)
    prior = None if text.prior is None else text.prior.index_select(0, rows)
    return TextState(
        text.h.index_select(0, rows)[:, :L], mask[:, :L], text.q.index_select(0, rows)[:, :, :L], prior
    )


def slice_kv(kv: ImageKV, rows) -> ImageKV:
    return [(k[rows], v[rows]) for k, v in kv]


def _text_states(model: SlowModel, states, lengths, rows: np.ndarray) -> TextState:
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    lens = lengths[rows_t]
    L = max(1, int(lens.max()))
    return model.text_state(states[rows_t, :L], lens)


@torch.no_grad()
def score_all_pairs(model: SlowModel, feats, progress: bool = True) -> np.ndarray:
    """Every caption with every image of a DatasetFeatures: sim [n_captions, n_images] (float32).

    Each caption's text-only layers and each image's keys/values are computed once."""
    model.eval()
    if _generic(model):
        return _score_all_pairs_generic(model, feats, progress)
    M, N = len(feats.states), feats.n_images
    sim = np.zeros((M, N), dtype=np.float32)
    order = np.argsort(feats.lengths.numpy(), kind="stable")  # similar lengths share a chunk
    bar = _bar(M * N, "slow: all pairs", progress)
    with autocast():
        texts = []
        for s in range(0, M, TEXT_CHUNK):
            rows = order[s : s + TEXT_CHUNK]
            texts.append((rows, _text_states(model, feats.states, feats.lengths, rows)))
        for i0 in range(0, N, 256):
            imgs = slice(i0, min(N, i0 + 256))
            grid = _grid_or_none(model, feats.grid[imgs])
            kv = model.image_kv(feats.mid[imgs], grid)
            n_img = len(kv[0][0])
            for j0 in range(0, n_img, IMAGE_CHUNK):
                sub = slice_kv(kv, slice(j0, j0 + IMAGE_CHUNK))
                cols = np.arange(i0 + j0, i0 + min(n_img, j0 + IMAGE_CHUNK))
                for rows, text in texts:
                    sim[np.ix_(rows, cols)] = model.score_block(text, sub).float().numpy()
                    bar.update(len(rows) * len(cols))
    bar.close()
    return sim


@torch.no_grad()
def all_text_states(model: SlowModel, states, lengths, rows: np.ndarray | None = None) -> TextState:
    """TextState of many texts (all, or ``rows``), computed in length-sorted chunks and kept in the compute dtype (bf16 where native)."""
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows)
    T = len(rows)
    L = max(1, int(lengths[torch.as_tensor(rows)].max())) if T else 1
    c = model.config
    heads = model.layers[0].cross_attn.heads
    h = torch.zeros(T, L, c.text_dim, dtype=compute_dtype())
    q = torch.zeros(T, heads, L, c.text_dim // heads, dtype=compute_dtype())
    mask = torch.zeros(T, L, dtype=torch.bool)
    fast = getattr(model, "prior", None)
    prior = None if fast is None else torch.zeros(T, fast.output_dim)
    order = np.argsort(lengths[torch.as_tensor(rows)].numpy(), kind="stable")
    with autocast():
        for s in range(0, T, 512):
            pos = torch.as_tensor(order[s : s + 512])
            part = _text_states(model, states, lengths, rows[order[s : s + 512]])
            n = part.mask.shape[1]
            h[pos, :n], q[pos, :, :n], mask[pos, :n] = part.h.to(h.dtype), part.q.to(q.dtype), part.mask
            if prior is not None:
                prior[pos] = part.prior
    return TextState(h, mask, q, prior)


@torch.no_grad()
def score_pairs_grouped(
    model: SlowModel,
    states: torch.Tensor,
    lengths: torch.Tensor,
    mid: torch.Tensor,
    grid: torch.Tensor | None,
    text_index: np.ndarray,
    image_index: np.ndarray,
    progress: bool = False,
    desc: str = "slow: pairs",
) -> np.ndarray:
    """Scores of arbitrary (text, image) pairs. Every text's text-only layers run once; pairs are grouped by
    image, so each image's keys/values are computed once and its texts are scored as one block."""
    model.eval()
    text_index, image_index = np.asarray(text_index), np.asarray(image_index)
    out = np.zeros(len(text_index), dtype=np.float32)
    if len(out) == 0:
        return out
    if _generic(model):  # the joint deformer: its own pair path (no per-text state to reuse)
        with torch.no_grad():
            scores = model.score_texts_images(
                states, lengths, mid, grid, torch.as_tensor(text_index), torch.as_tensor(image_index)
            )
        return scores.float().numpy()
    texts_needed, text_pos = np.unique(text_index, return_inverse=True)
    text = all_text_states(model, states, lengths, texts_needed)
    order = np.argsort(image_index, kind="stable")
    imgs, starts = np.unique(image_index[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    bar = _bar(len(out), desc, progress)
    with autocast():
        for c0 in range(0, len(imgs), IMAGE_CHUNK * 4):
            chunk = imgs[c0 : c0 + IMAGE_CHUNK * 4]
            sel = torch.as_tensor(chunk, dtype=torch.long)
            kv = model.image_kv(mid[sel], None if grid is None else grid[sel])
            for j in range(len(chunk)):
                pairs = order[starts[c0 + j] : ends[c0 + j]]
                rows = torch.as_tensor(text_pos[pairs], dtype=torch.long)
                for r0 in range(0, len(rows), TEXT_CHUNK * 2):
                    r = rows[r0 : r0 + TEXT_CHUNK * 2]
                    n = len(r)
                    # pad the block to a multiple of 8 texts and 8 tokens: few distinct shapes, so the
                    # CPU matmul kernels made for one shape are reused by the next images
                    r = torch.cat([r, r[-1:].expand((-n) % 8)])
                    s = model.score_block(subset_text(text, r, 8), slice_kv(kv, slice(j, j + 1)))
                    out[pairs[r0 : r0 + n]] = s[:n, 0].float().numpy()
                bar.update(len(pairs))
    bar.close()
    return out


def top_k(sim: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k highest values, best first."""
    k = min(k, sim.shape[1])
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(sim, part, 1)
    return np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), 1)


def place_candidates(sim: np.ndarray, cand: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """sim with each row's candidates (cand [R,K]) set to their fused scores, ranked above every
    non-candidate of the row (whose order is kept)."""
    out = sim.astype(np.float64, copy=True)
    span = float(np.abs(sim).max(initial=0.0) + np.abs(fused).max(initial=0.0)) + 1.0
    out -= 2 * span  # non-candidates below any fused score
    np.put_along_axis(out, cand, fused.astype(np.float64), 1)
    return out


def fusion_weights(model: SlowModel) -> tuple[float, float]:
    return float(model.config.fusion_weight), float(model.config.fusion_weight_i2t)


def rerank_candidates(model, feats, sim: np.ndarray, K: int, progress: bool = True):
    """Slow scores of each caption's Fast top-K images and each image's Fast top-K captions.

    Returns (cand_t2i [M,K], slow_t2i [M,K], cand_i2t [N,K], slow_i2t [N,K], seconds_t2i, seconds_i2t)."""
    M, N = sim.shape
    grid = _grid_or_none(model, feats.grid)
    cand_t2i = top_k(sim, K)
    t0 = time.perf_counter()
    slow_t2i = score_pairs_grouped(
        model,
        feats.states,
        feats.lengths,
        feats.mid,
        grid,
        np.repeat(np.arange(M), cand_t2i.shape[1]),
        cand_t2i.ravel(),
        progress,
        f"slow: re-rank top-{K} (t2i)",
    ).reshape(cand_t2i.shape)
    t1 = time.perf_counter()
    cand_i2t = top_k(sim.T, K)
    slow_i2t = score_pairs_grouped(
        model,
        feats.states,
        feats.lengths,
        feats.mid,
        grid,
        cand_i2t.ravel(),
        np.repeat(np.arange(N), cand_i2t.shape[1]),
        progress,
        f"slow: re-rank top-{K} (i2t)",
    ).reshape(cand_i2t.shape)
    t2 = time.perf_counter()
    return cand_t2i, slow_t2i, cand_i2t, slow_i2t, t1 - t0, t2 - t1


def fused_matrices(sim, cand_t2i, slow_t2i, cand_i2t, slow_i2t, w_t2i: float, w_i2t: float):
    fused_t2i = np.take_along_axis(sim, cand_t2i, 1) + w_t2i * slow_t2i
    sim_t2i = place_candidates(sim, cand_t2i, fused_t2i)
    fused_i2t = np.take_along_axis(sim.T, cand_i2t, 1) + w_i2t * slow_i2t
    sim_i2t = place_candidates(sim.T, cand_i2t, fused_i2t).T
    return sim_t2i, sim_i2t


@torch.no_grad()
def measure_costs(model: SlowModel, feats, K: int, n_queries: int = 8, gallery_sample: int = 256) -> dict:
    """Per text query, measured here (text token states come from the cache; the frozen MiniLM layers
    are part of the Fast encode time): re-ranking K images (text layers + their keys/values + K pairs),
    also with image keys/values cached; and the Slow model alone over the whole gallery, extrapolated
    from ``gallery_sample`` images per query with image keys/values precomputed (the favourable case)."""
    if _generic(model):
        return _measure_costs_generic(model, feats, K, n_queries, gallery_sample)
    model.eval()
    N = feats.n_images
    M = len(feats.states)
    rng = np.random.default_rng(0)
    queries = rng.choice(M, size=min(n_queries, M), replace=False)
    grid = _grid_or_none(model, feats.grid)
    K = min(K, N)
    cold, warm = [], []
    with autocast():
        for n, q in enumerate(queries):
            imgs = torch.as_tensor(rng.choice(N, size=K, replace=False))
            t0 = time.perf_counter()
            text = _text_states(model, feats.states, feats.lengths, np.array([q]))
            t1 = time.perf_counter()
            kv = model.image_kv(feats.mid[imgs], None if grid is None else grid[imgs])
            t2 = time.perf_counter()
            model.score_block(text, kv)
            t3 = time.perf_counter()
            if n:  # the first one warms up
                cold.append(t3 - t0)
                warm.append((t1 - t0) + (t3 - t2))
        S = min(gallery_sample, N)
        sample = torch.as_tensor(rng.choice(N, size=S, replace=False))
        kv = model.image_kv(feats.mid[sample], None if grid is None else grid[sample])
        gallery = []
        for q in queries[: max(2, n_queries // 2)]:
            t0 = time.perf_counter()
            text = _text_states(model, feats.states, feats.lengths, np.array([q]))
            t_text = time.perf_counter() - t0
            for j0 in range(0, S, 64):
                model.score_block(text, slice_kv(kv, slice(j0, j0 + 64)))
            gallery.append((t_text, time.perf_counter() - t0 - t_text))
    t_text = float(np.median([g[0] for g in gallery]))
    per_pair = float(np.median([g[1] for g in gallery])) / S
    return {
        "rerank_k": K,
        "slow_pairs_per_query": K,
        "rerank_ms_per_query": 1e3 * float(np.median(cold)),
        "rerank_ms_per_query_cached_images": 1e3 * float(np.median(warm)),
        "slow_alone_pairs_per_query": N,
        "slow_alone_ms_per_query_gallery": 1e3 * (t_text + per_pair * N),
        "slow_alone_note": (
            f"extrapolated to {N} images from {S} sampled images x {len(gallery)} queries, "
            "image keys/values precomputed (not counted)"
        ),
        "slow_compute_ratio_pairs": N / K,
    }


def rerank_eval(rerank_model_name_or_path, feats, sim: np.ndarray, K: int, progress: bool = True):
    """`vlsearch eval --rerank K`: (sim_t2i, sim_i2t, cost) where each caption row's (image column's) Fast
    top-K are replaced by fused scores ranked above all non-candidates."""
    from vlsearch.errors import CheckpointError
    from vlsearch.models.registry import load_model

    model, meta, path = load_model(rerank_model_name_or_path)
    if not getattr(model, "is_pair_scorer", False):
        raise CheckpointError(
            f"{rerank_model_name_or_path!r} is a {meta['model_type']} model, not a pair scorer"
        )
    if feats.mid is None:
        raise ValueError("re-ranking needs the 14x14 mid features: DatasetFeatures.load(..., mid=True)")
    cand_t2i, slow_t2i, cand_i2t, slow_i2t, sec_t2i, sec_i2t = rerank_candidates(
        model, feats, sim, K, progress
    )
    w_t2i, w_i2t = fusion_weights(model)
    sim_t2i, sim_i2t = fused_matrices(sim, cand_t2i, slow_t2i, cand_i2t, slow_i2t, w_t2i, w_i2t)
    cost = measure_costs(model, feats, K)
    cost.update(
        {
            "fusion_weight_t2i": w_t2i,
            "fusion_weight_i2t": w_i2t,
            "rerank_batch_ms_per_query_t2i": 1e3 * sec_t2i / len(sim),
            "rerank_batch_ms_per_query_i2t": 1e3 * sec_i2t / sim.shape[1],
        }
    )
    return sim_t2i, sim_i2t, cost


class Reranker:
    """Rescores a query's Fast candidates with a Slow model; images come from the feature cache by key."""

    def __init__(
        self, model: SlowModel, meta: dict | None = None, path=None, extractor=None, cache_images=2048
    ):
        self.model = inference_copy(model)
        self.meta = meta or {}
        self.path = Path(path) if path else None
        self.extractor = extractor
        self._kv: OrderedDict[str, ImageKV] = OrderedDict()
        self.cache_images = cache_images
        # keys -> image files, for features the cache lost (pruned, another VLSEARCH_HOME, built elsewhere)
        self.locate: Callable[[list[str]], dict[str, str]] | None = None

    @classmethod
    def load(cls, checkpoint_path, extractor=None) -> Reranker:
        from vlsearch.models.checkpoint import load_checkpoint

        model, meta = load_checkpoint(checkpoint_path, SlowModel)
        return cls(model, meta, checkpoint_path, extractor)

    def _need_extractor(self):
        if self.extractor is None:
            from vlsearch.encoders.features import FeatureExtractor

            self.extractor = FeatureExtractor(progress=False)
        return self.extractor

    @torch.no_grad()
    def image_kv(self, keys: list[str]) -> ImageKV:
        """Keys/values of these cached images, memoised per content key (LRU)."""
        todo = list(dict.fromkeys(k for k in keys if k not in self._kv))
        if todo:
            fx = self._need_extractor()
            mid = torch.from_numpy(fx.images.get_stacked(todo, "mid"))
            grid = (
                torch.from_numpy(fx.images.get_stacked(todo, "grid")) if self.model.config.use_grid else None
            )
            with autocast():
                kv = self.model.image_kv(mid, grid)
            for i, key in enumerate(todo):
                self._kv[key] = [(k[i : i + 1], v[i : i + 1]) for k, v in kv]
        for key in keys:
            self._kv.move_to_end(key)
        out = [
            (
                torch.cat([self._kv[key][j][0] for key in keys]),
                torch.cat([self._kv[key][j][1] for key in keys]),
            )
            for j in range(len(self._kv[keys[0]]) if keys else 0)  # fusion layers (+ the Fast prior)
        ]
        while len(self._kv) > self.cache_images:
            self._kv.popitem(last=False)
        return out

    def unavailable(self, keys: list[str]) -> set[str]:
        """Keys whose features are neither memoised nor cached, after recomputing what can be from the
        image files (``locate``); what is left has no file (or a changed one) and cannot be re-ranked."""
        fx = self._need_extractor()
        lost = set(fx.images.missing([k for k in dict.fromkeys(keys) if k not in self._kv]))
        if lost and self.locate is not None:
            paths = self.locate(sorted(lost))
            found = fx.image_keys([paths[k] for k in sorted(lost) if k in paths]).keys
            lost -= set(k for k in found if k)
        return lost

    @torch.no_grad()
    def rerank_text(self, text: str, keys: list[str], fast_scores, explain: bool = False):
        """(fused [K], slow [K], explanations or None) for one text query and its K candidate images.
        A candidate whose features cannot be had keeps its Fast score, with a NaN Slow score (and no
        explanation)."""
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
        kv = self.image_kv(list(keys))
        with autocast():
            tstate = self.model.text_state(torch.from_numpy(states), torch.from_numpy(lengths))
            out = self.model.score_block(tstate, kv, keep_weights=explain)
        scores, weights = out if explain else (out, None)
        slow = scores[0].float().numpy()
        fused = fast_scores + self.model.config.fusion_weight * slow
        explanations = None
        if explain:
            from vlsearch.search.explain import word_maps

            maps = self.model.attention_maps(weights[0])  # [K, L, 196]
            tokens = fx.text_backbone.tokenizer.convert_ids_to_tokens(ids[0][: int(lengths[0])].tolist())
            side = self.model.config.mid_side
            explanations = [word_maps(tokens, maps[i].numpy(), side) for i in range(len(keys))]
        return fused, slow, explanations

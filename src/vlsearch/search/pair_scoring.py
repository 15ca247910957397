"""Offline scoring with any pair scorer (``models/contracts.PairScorer``: Slow, deformer-joint): every
pair of a split (`vlsearch eval --model slow`), arbitrary pairs grouped by image (distillation
teachers), each caption's and each image's dual-encoder top-K (`vlsearch eval --rerank K`, the
fusion-weight search after training). The online, per-query path is ``search/rerank.Reranker``.

Everything goes through the contract's three calls: each text's state and each image's state are
computed once, and ``score`` runs on blocks of texts x images.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from vlsearch.errors import CheckpointError
from vlsearch.models.compact import CompactScorer
from vlsearch.models.contracts import is_pair_scorer
from vlsearch.models.registry import load_model
from vlsearch.precision import autocast
from vlsearch.search.fusion import fused_matrices, fusion_weights, top_k
from vlsearch.search.rerank_cost import measure_costs

IMAGE_CHUNK = 16  # images per score call (all pairs)
TEXT_CHUNK = 128  # texts per score call
STATE_CHUNK = 512  # texts per text_state call


def _bar(total: int, desc: str, progress: bool):
    return tqdm(
        total=total, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True, unit="pair"
    )


def _rows(x: torch.Tensor | None, idx):
    return None if x is None else x[idx]


def _chunk_state(model, states: torch.Tensor, lengths: torch.Tensor, rows):
    """The text state of these rows, trimmed to their longest text."""
    r = torch.as_tensor(rows, dtype=torch.long)
    lens = lengths[r]
    return model.text_state(states[r, : max(1, int(lens.max()))], lens)


def text_states(model, states: torch.Tensor, lengths: torch.Tensor, rows=None):
    """The text states of ``rows`` (default all), in that order: computed in length-sorted chunks, each
    trimmed to its own longest text, then stacked (padding is masked, so scores are exact)."""
    rows = np.arange(len(lengths)) if rows is None else np.asarray(rows)
    order = np.argsort(lengths[torch.as_tensor(rows)].numpy(), kind="stable")
    parts = []
    with autocast():
        for s in range(0, len(rows), STATE_CHUNK):
            parts.append(_chunk_state(model, states, lengths, rows[order[s : s + STATE_CHUNK]]))
    return type(parts[0]).stack(parts).rows(torch.as_tensor(np.argsort(order, kind="stable")))


@torch.no_grad()
def score_all_pairs(model, feats, progress: bool = True) -> np.ndarray:
    """Every caption with every image of a DatasetFeatures: sim [n_captions, n_images] (float32)."""
    model.eval()
    M, N = len(feats.states), feats.n_images
    sim = np.zeros((M, N), dtype=np.float32)
    order = np.argsort(feats.lengths.numpy(), kind="stable")  # similar lengths share a chunk
    bar = _bar(M * N, f"{model.model_type}: all pairs", progress)
    with autocast():
        chunks = [order[s : s + TEXT_CHUNK] for s in range(0, M, TEXT_CHUNK)]
        texts = [(rows, _chunk_state(model, feats.states, feats.lengths, rows)) for rows in chunks]
        for i0 in range(0, N, 256):
            imgs = slice(i0, min(N, i0 + 256))
            image = model.image_state(feats.grid[imgs], _rows(feats.mid, imgs))
            n_img = len(image)
            for j0 in range(0, n_img, IMAGE_CHUNK):
                block = image.rows(slice(j0, j0 + IMAGE_CHUNK))
                cols = np.arange(i0 + j0, i0 + min(n_img, j0 + IMAGE_CHUNK))
                for rows, text in texts:
                    sim[np.ix_(rows, cols)] = model.score(text, block).float().numpy()
                    bar.update(len(rows) * len(cols))
    bar.close()
    return sim


@torch.no_grad()
def score_pairs_grouped(
    model,
    states: torch.Tensor,
    lengths: torch.Tensor,
    grid: torch.Tensor | None,
    mid: torch.Tensor | None,
    text_index: np.ndarray,
    image_index: np.ndarray,
    progress: bool = False,
    desc: str = "pair scorer: pairs",
) -> np.ndarray:
    """Scores of arbitrary (text, image) pairs. Every text's state is computed once; pairs are grouped by
    image, so each image's state is computed once and its texts are scored as one block."""
    model.eval()
    text_index, image_index = np.asarray(text_index), np.asarray(image_index)
    out = np.zeros(len(text_index), dtype=np.float32)
    if len(out) == 0:
        return out
    texts_needed, text_pos = np.unique(text_index, return_inverse=True)
    text = text_states(model, states, lengths, texts_needed)
    order = np.argsort(image_index, kind="stable")
    imgs, starts = np.unique(image_index[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    bar = _bar(len(out), desc, progress)
    with autocast():
        for c0 in range(0, len(imgs), IMAGE_CHUNK * 4):
            chunk = imgs[c0 : c0 + IMAGE_CHUNK * 4]
            sel = torch.as_tensor(chunk, dtype=torch.long)
            image = model.image_state(_rows(grid, sel), _rows(mid, sel))
            for j in range(len(chunk)):
                pairs = order[starts[c0 + j] : ends[c0 + j]]
                rows = torch.as_tensor(text_pos[pairs], dtype=torch.long)
                one = image.rows(slice(j, j + 1))
                for r0 in range(0, len(rows), TEXT_CHUNK * 2):
                    r = rows[r0 : r0 + TEXT_CHUNK * 2]
                    n = len(r)
                    # pad the block to a multiple of 8 texts: few distinct shapes, so the CPU matmul
                    # kernels made for one shape are reused by the next images
                    r = torch.cat([r, r[-1:].expand((-n) % 8)])
                    s = model.score(text.rows(r), one)
                    out[pairs[r0 : r0 + n]] = s[:n, 0].float().numpy()
                bar.update(len(pairs))
    bar.close()
    return out


@torch.no_grad()
def score_each_text(
    model,
    states: torch.Tensor,
    lengths: torch.Tensor,
    grid: torch.Tensor | None,
    mid: torch.Tensor | None,
    candidates: np.ndarray,
    progress: bool = False,
    desc: str = "pair scorer: each text's candidates",
) -> np.ndarray:
    """Each text against its own candidate images, one text per ``score`` call, the call the online
    re-ranker makes for a query (search/rerank.Reranker): candidates [M, K] image rows -> scores [M, K].
    Each candidate image's state is computed once (held for all of them: ~190 KB per image for Slow)."""
    model.eval()
    M, K = candidates.shape
    out = np.zeros((M, K), dtype=np.float32)
    if out.size == 0:
        return out
    images, where = np.unique(candidates, return_inverse=True)
    where = where.reshape(M, K)
    text = text_states(model, states, lengths)
    bar = _bar(out.size, desc, progress)
    with autocast():
        parts = []
        for c0 in range(0, len(images), 256):
            sel = torch.as_tensor(images[c0 : c0 + 256], dtype=torch.long)
            parts.append(model.image_state(_rows(grid, sel), _rows(mid, sel)))
        image = type(parts[0]).stack(parts)
        for i in range(M):
            block = image.rows(torch.as_tensor(where[i], dtype=torch.long))
            out[i] = model.score(text.rows(slice(i, i + 1)), block)[0].float().numpy()
            bar.update(K)
    bar.close()
    return out


def rerank_candidates(model, feats, sim: np.ndarray, K: int, progress: bool = True):
    """Pair scores of each caption's dual-encoder top-K images (one caption per call, as a query is
    re-ranked online) and each image's top-K captions (grouped by image).

    Returns (cand_t2i [M,K], slow_t2i [M,K], cand_i2t [N,K], slow_i2t [N,K], seconds_t2i, seconds_i2t)."""
    M, N = sim.shape
    cand_t2i = top_k(sim, K)
    t0 = time.perf_counter()
    slow_t2i = score_each_text(  # as a query is re-ranked online: one caption, its K images
        model,
        feats.states,
        feats.lengths,
        feats.grid,
        feats.mid,
        cand_t2i,
        progress,
        f"{model.model_type}: re-rank top-{K} (t2i)",
    )
    t1 = time.perf_counter()
    cand_i2t = top_k(sim.T, K)
    slow_i2t = score_pairs_grouped(
        model,
        feats.states,
        feats.lengths,
        feats.grid,
        feats.mid,
        cand_i2t.ravel(),
        np.repeat(np.arange(N), cand_i2t.shape[1]),
        progress,
        f"{model.model_type}: re-rank top-{K} (i2t)",
    ).reshape(cand_i2t.shape)
    t2 = time.perf_counter()
    return cand_t2i, slow_t2i, cand_i2t, slow_i2t, t1 - t0, t2 - t1


def rerank_eval(
    rerank_model_name_or_path, feats, sim: np.ndarray, K: int, progress: bool = True, compact: bool = False
):
    """`vlsearch eval --rerank K`: (sim_t2i, sim_i2t, cost) where each caption row's (image column's)
    dual-encoder top-K are replaced by fused scores ranked above all non-candidates. ``compact``: the
    pair scorer reads its images through the compact store's int8 parts (models/compact.py)."""
    model, meta, _ = load_model(rerank_model_name_or_path)
    if not is_pair_scorer(model):
        raise CheckpointError(
            f"{rerank_model_name_or_path!r} is a {meta['model_type']} model, not a pair scorer: "
            "re-rank with `slow` or `deformer-joint`"
        )
    if compact:
        model = CompactScorer(model)
    cand_t2i, slow_t2i, cand_i2t, slow_i2t, sec_t2i, sec_i2t = rerank_candidates(
        model, feats, sim, K, progress
    )
    w_t2i, w_i2t = fusion_weights(model)
    sim_t2i, sim_i2t = fused_matrices(sim, cand_t2i, slow_t2i, cand_i2t, slow_i2t, w_t2i, w_i2t)
    cost = measure_costs(model, feats, K)
    if compact:
        cost["rerank_feature_bytes_per_image"] = model.bytes_per_image
    cost.update(
        {
            "fusion_weight_t2i": w_t2i,
            "fusion_weight_i2t": w_i2t,
            "rerank_batch_ms_per_query_t2i": 1e3 * sec_t2i / len(sim),
            "rerank_batch_ms_per_query_i2t": 1e3 * sec_i2t / sim.shape[1],
        }
    )
    return sim_t2i, sim_i2t, cost

"""Per-query cost of VLDeformer's two modes: the joint model scores every gallery image, the decomposed
one encodes the caption and searches a faiss index (moved here from models/deformer.py: a model module
builds no indexes)."""

from __future__ import annotations

import time

import numpy as np
import torch

from vlsearch.index.vectors import make_vector_index
from vlsearch.models.deformer import DeformerModel
from vlsearch.models.states import ImageTokens
from vlsearch.precision import autocast, inference_copy


@torch.no_grad()
def joint_vs_decomposed_cost(
    joint: DeformerModel,
    decomposed: DeformerModel,
    grid: torch.Tensor,
    mid: torch.Tensor | None,
    states: torch.Tensor,
    lengths: torch.Tensor,
    gallery_sizes=(1000, 10_000, 100_000),
    joint_measured: int = 1000,
    index_kind: str = "flat",
    batch: int = 256,
    seed: int = 0,
    query_texts: list[str] | None = None,
    embed_query=None,
    text_states=None,
) -> list[dict]:
    """Per text query cost of the joint model (score every gallery image) vs the decomposed one, one run.

    ``grid``/``mid`` are real gallery images (e.g. the 1,000 dev images), ``states``/``lengths`` real
    caption queries (each is timed, the mean reported). Both models get their offline work for free: the
    joint model's image tokens and the decomposed model's gallery embeddings are computed before timing.

    * joint, per query: one early-interaction forward pass per gallery image, timed over the first
      ``joint_measured`` images (all of them at 1k) and scaled linearly beyond (labelled ``extrapolated``;
      the forward passes are independent, so the cost is linear in the gallery by construction).
    * decomposed, per query: encode the caption once + top-10 search of a ``index_kind`` faiss index
      over the gallery embeddings (the real images, topped up with random unit vectors for the
      synthetic 10k/100k galleries), both timed at every size.

    Both models run as the search path runs them: copies with bf16 linear weights (``inference_copy``).

    From text (``query_texts`` with ``embed_query``, the search path's text -> embedding, e.g. an
    ``Embedder``'s on the query runtime, and ``text_states``, text -> the MiniLM states both models start
    from): the decomposed query is timed from its text, and the joint model is charged its text states
    too. Rows then also carry ``*_from_text`` figures.
    """
    joint, decomposed = inference_copy(joint), inference_copy(decomposed)
    n_real = len(grid)
    with autocast():
        m = min(joint_measured, max(gallery_sizes))
        reps = -(-m // n_real)
        img = joint.image_tokens(grid, mid)
        parts = (img.tokens, img.tower, img.concept)
        img_tok = ImageTokens(
            *(None if x is None else x.repeat(reps, *[1] * (x.dim() - 1))[:m] for x in parts)
        )
        real_emb = torch.cat(
            [
                decomposed.encode_image(grid[s : s + batch], None if mid is None else mid[s : s + batch])
                for s in range(0, n_real, batch)
            ]
        ).float()
    real_emb = real_emb.numpy()
    # each model's queries run back to back, as a service running that model alone would run them
    # (interleaved, the joint model's large activations would evict the small model's weights), after a
    # warm-up pass: a service has long seen every query length (oneDNN prepares its kernels per shape)
    single = [(states[q : q + 1, : int(lengths[q])], lengths[q : q + 1]) for q in range(len(states))]
    joint_s, encode_s, queries = [], [], []
    with autocast():
        for st, ln in single:
            decomposed.encode_text(st, ln)
        for st, ln in single:
            t0 = time.perf_counter()
            queries.append(decomposed.encode_text(st, ln).float().numpy())
            encode_s.append(time.perf_counter() - t0)
        for st, ln in single:
            txt, mask = joint.text_tokens(st, ln)
            concept = joint.text_concept(st, ln)

            def rows(x, b):
                return None if x is None else x.expand(b, *x.shape[1:])

            joint.joint_logits(img_tok[:8], rows(txt, 8), rows(mask, 8), rows(concept, 8))  # warm-up
            t0 = time.perf_counter()
            for s in range(0, m, batch):
                b = min(batch, m - s)
                joint.joint_logits(img_tok[s : s + b], rows(txt, b), rows(mask, b), rows(concept, b))
            joint_s.append(time.perf_counter() - t0)
    # the same queries encoded as one padded batch: the per-query cost of a batch of queries (the joint
    # model's pairs are batched too, ``batch`` per forward pass)
    with autocast():
        decomposed.encode_text(states, lengths)
        t0 = time.perf_counter()
        decomposed.encode_text(states, lengths)
        encode_batched = (time.perf_counter() - t0) / len(states)
    per_pair = float(np.mean(joint_s)) / m
    encode = float(np.mean(encode_s))
    from_text = None
    if query_texts:
        for t in query_texts:  # warm-up: every fixed-length query model and tokeniser path
            embed_query(t)
            text_states([t])
        enc_t, states_t = [], []
        for t in query_texts:
            t0 = time.perf_counter()
            embed_query(t)
            enc_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            text_states([t])
            states_t.append(time.perf_counter() - t0)
        from_text = (float(np.median(enc_t)), float(np.median(states_t)))
    qv = np.concatenate(queries)
    rng = np.random.default_rng(seed)
    rows = []
    for n in gallery_sizes:
        extra = max(0, n - n_real)
        fake = rng.standard_normal((extra, real_emb.shape[1])).astype(np.float32)
        fake /= np.linalg.norm(fake, axis=1, keepdims=True)
        emb = np.concatenate([real_emb[:n], fake])
        index = make_vector_index(emb.shape[1], n, index_kind)
        index.add(emb)
        index.search(qv[:1], 10)  # warm-up
        t0 = time.perf_counter()
        for row in qv:
            index.search(row[None], 10)
        search = (time.perf_counter() - t0) / len(qv)
        index.search(qv, 10)  # the batch of queries at once
        t0 = time.perf_counter()
        index.search(qv, 10)
        search_batched = (time.perf_counter() - t0) / len(qv)
        joint_ms = 1e3 * per_pair * n
        dec_ms = 1e3 * (encode + search)
        dec_batched_ms = 1e3 * (encode_batched + search_batched)
        rows.append(
            {
                "gallery": n,
                "synthetic_images": extra,
                "joint_ms_per_query": joint_ms,
                "joint_extrapolated": n > m,
                "decomposed_encode_ms": 1e3 * encode,
                "decomposed_search_ms": 1e3 * search,
                "decomposed_ms_per_query": dec_ms,
                "index": index.kind,
                "speedup": joint_ms / dec_ms,
                "decomposed_batched_ms_per_query": dec_batched_ms,
                "speedup_batched": joint_ms / dec_batched_ms,
            }
        )
        if from_text is not None:
            dec_text_ms = 1e3 * (from_text[0] + search)
            rows[-1].update(
                {
                    "decomposed_query_from_text_ms": 1e3 * from_text[0],
                    "joint_text_states_ms": 1e3 * from_text[1],
                    "decomposed_ms_per_query_from_text": dec_text_ms,
                    "speedup_from_text": (joint_ms + 1e3 * from_text[1]) / dec_text_ms,
                }
            )
    return rows

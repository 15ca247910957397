"""One small interface over faiss indexes of unit vectors searched by inner product (cosine).

``make_vector_index(kind="auto")`` picks by gallery size: exact search (Flat) below ``AUTO_THRESHOLD``
vectors, an HNSW graph up to ``AUTO_IVF_THRESHOLD``, IVF-SQ (inverted lists of fp16 codes) up to
``AUTO_IVFPQ_THRESHOLD``, and IVF-PQ beyond, where even fp16 codes would not fit in memory. Their recall
against exact search `vlsearch eval --index` and `vlsearch bench` report. IVF-Flat (inverted lists of full
vectors) builds much faster than HNSW on few cores; IVF-SQ keeps the same lists in half the bytes, for
the same recall. IVF-PQ keeps 32-byte codes in memory and re-checks its top ``k * k_factor`` candidates
exactly against the fp16 embeddings (the gallery's memory-mapped ``embeddings.npy``, attached with
``attach_vectors``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import faiss
import numpy as np
import torch

AUTO_THRESHOLD = 50_000
# From here "auto" picks IVF-SQ: on 2 cores an HNSW graph of 1M 640-d vectors takes 2-3.5 min to build
# and keeps only recall@10 0.88 at efSearch 512, where IVF-SQ builds in ~70 s and keeps 0.98 (IVF-PQ
# 0.89) at 1.3 GB per million vectors (`vlsearch bench`, docs/bench-avx512.md).
AUTO_IVF_THRESHOLD = 500_000
# From here IVF-PQ: fp16 codes of 8M 640-d vectors fill 10 GB; PQ codes take 1/40 of it.
AUTO_IVFPQ_THRESHOLD = 8_000_000


def inner_products(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``vectors @ query`` in float32, for rows read from the stored (fp16, memory-mapped) embeddings.

    On PyTorch's thread pool, not numpy's: numpy's matmul runs on OpenBLAS, whose worker threads then
    spin and take the cores from whatever runs next. After IVF-PQ's re-check of 2,000 rows a Slow
    re-ranking ran 1.5x slower (`vlsearch bench` at 1M: Fast+Slow K=50 135 ms with IVF-PQ, 46-49 ms with
    the other kinds). PyTorch also converts fp16 to fp32 4x faster (2,000 x 640: 0.6 ms against 2.4).
    """
    vectors = np.asarray(vectors)
    if not vectors.flags.writeable:  # a slice of a read-only memory map
        vectors = vectors.copy()
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32).reshape(-1))
    return torch.mv(torch.from_numpy(np.ascontiguousarray(vectors)).float(), q).numpy()


class VectorIndex(ABC):
    kind: str = ""

    def __init__(self, index: faiss.Index):
        self.index = index

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q,k], rows [Q,k]); k is clipped to the index size, missing slots are row -1."""
        k = max(1, min(int(k), len(self)))
        if len(self) == 0:
            q = len(queries)
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def write(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    def attach_vectors(self, vectors) -> None:
        """The gallery's stored embeddings (fp16, memory-mapped), for kinds that re-check candidates."""
        return None

    def reconstruct_all(self) -> np.ndarray:
        """Every stored vector [len, dim], row order (exact for flat indexes: captions are flat)."""
        return self.index.reconstruct_n(0, len(self))

    def deleted(self) -> np.ndarray:
        """Rows that ``search`` never returns (a segmented index's tombstones); here none."""
        return np.zeros(0, np.int64)

    @abstractmethod
    def configure(self, **params) -> None:
        """Search-time knobs (efSearch, nprobe)."""


class FlatIndex(VectorIndex):
    kind = "flat"

    @classmethod
    def create(cls, dim: int, n_expected: int = 0) -> FlatIndex:
        return cls(faiss.IndexFlatIP(dim))

    def configure(self, **params) -> None:
        pass


class HNSWIndex(VectorIndex):
    """Graph index. Defaults measured on 2 cores (docs/bench.md): M=32 with efConstruction=40 builds twice
    as fast as 80 for ~0.5 point less recall@10; efSearch grows with the gallery (128 -> 512 at 1M)."""

    kind = "hnsw"

    @classmethod
    def create(
        cls,
        dim: int,
        n_expected: int = 0,
        m: int = 32,
        ef_construction: int = 40,
        ef_search: int | None = None,
    ) -> HNSWIndex:
        if ef_search is None:  # recall@10 >= 0.95 measured: 128 up to 200k vectors, 512 at 1M
            ef_search = 128 if n_expected <= 200_000 else 256 if n_expected <= 500_000 else 512
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        return cls(index)

    def configure(self, ef_search: int | None = None, **_) -> None:
        if ef_search:
            self.index.hnsw.efSearch = int(ef_search)

    def search(self, queries, k):
        self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, int(k))
        return super().search(queries, k)


def default_nlist(n_expected: int) -> int:
    """About 4 sqrt(N) inverted lists (a power of two), and never more than N / 40 (k-means needs ~40/list)."""
    n = max(int(n_expected), 1)
    nlist = 1 << max(0, round(math.log2(4 * math.sqrt(n))))
    return int(max(1, min(nlist, n // 40, 65536)))


class _IVF(VectorIndex):
    """Shared by the inverted-file kinds: k-means on a sample of the first batch added, then add."""

    train_per_list = 40

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.index.is_trained:
            ivf = faiss.extract_index_ivf(self.index)
            n_train = min(len(vectors), self.train_per_list * ivf.nlist)
            sample = vectors
            if n_train < len(vectors):
                pick = np.random.default_rng(0).choice(len(vectors), n_train, replace=False)
                sample = vectors[np.sort(pick)]
            ivf.cp.niter = 10
            ivf.cp.min_points_per_centroid = 1  # small galleries: fewer points per list is fine, no warning
            if isinstance(ivf, faiss.IndexIVFPQ):
                ivf.pq.cp.min_points_per_centroid = 1
            self.index.train(sample)
        self.index.add(vectors)

    @property
    def nprobe(self) -> int:
        return faiss.extract_index_ivf(self.index).nprobe

    def configure(self, nprobe: int | None = None, **_) -> None:
        if nprobe:
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe)

    def search(self, queries, k):
        """One query scans its ``nprobe`` lists on every core (faiss parallel_mode 1: 3.75 -> 2.08 ms at
        1M, 640-d, nprobe 64, 2 cores, same results); a batch splits its queries over the cores (mode
        0). Both modes return the same rows, so concurrent callers may race on the switch."""
        faiss.extract_index_ivf(self.index).parallel_mode = 1 if len(queries) == 1 else 0
        return super().search(queries, k)


class IVFFlatIndex(_IVF):
    """Inverted lists of full float32 vectors: exact scores within the ``nprobe`` nearest lists."""

    kind = "ivfflat"

    @classmethod
    def create(
        cls, dim: int, n_expected: int = 0, nlist: int | None = None, nprobe: int = 64
    ) -> IVFFlatIndex:
        nlist = nlist or default_nlist(n_expected)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, nlist)
        return cls(index)


class IVFSQIndex(_IVF):
    """Inverted lists of fp16 vectors (faiss scalar quantiser): half IVF-Flat's memory and scan bytes. At
    1M, 640-d, nprobe 64 of 4096 it measured recall@10 0.985 of exact against IVF-Flat's 0.984, and 1.60
    ms per query against 2.21 (session 15, 2-core AMX Xeon); 8-bit codes lost a point of recall for 0.1
    ms more. `vlsearch bench` at 1M on a Zen 5 EPYC: both 0.977, Fast query 3.3-4.0 ms text included."""

    kind = "ivfsq"

    @classmethod
    def create(cls, dim: int, n_expected: int = 0, nlist: int | None = None, nprobe: int = 64) -> IVFSQIndex:
        nlist = nlist or default_nlist(n_expected)
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.nprobe = min(nprobe, nlist)
        return cls(index)


class IVFPQIndex(_IVF):
    """Inverted lists over product-quantised codes (``m`` bytes per vector); needs training before ``add``.

    Candidates (``k * k_factor`` per query) are re-scored exactly against fp16 vectors: the gallery's
    memory-mapped embeddings once attached, else an in-memory fp16 copy of what was added. With 32-byte
    codes the true top-10 is often ranked beyond 100 by the codes: k_factor 40 (a 200 KB fp16 read per
    query) brings recall@10 to the IVF limit of its nprobe (0.96 at 1M, nprobe 64 of 4096).
    """

    kind = "ivfpq"

    def __init__(self, index: faiss.Index, k_factor: int = 40):
        super().__init__(index)
        self.k_factor = k_factor
        self._vectors = None

    @classmethod
    def create(
        cls, dim: int, n_expected: int = 0, nlist: int | None = None, m: int = 32, nprobe: int = 64
    ) -> IVFPQIndex:
        nlist = nlist or default_nlist(n_expected)
        m = min(m, dim)
        # A width that m does not divide (641: 640 + the hubness prior's column, models/hubness.py) is
        # padded with zero columns by faiss's own transform, so the codes keep m sub-quantisers.
        padded = -(-dim // m) * m
        # 8-bit codes need 256 centroids per sub-quantiser; very small galleries get fewer bits.
        nbits = (
            8 if n_expected >= 10_000 or not n_expected else max(4, min(8, int(math.log2(n_expected)) - 2))
        )
        index = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(padded), padded, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT
        )
        index.nprobe = min(nprobe, nlist)
        if padded != dim:
            index = faiss.IndexPreTransform(faiss.RemapDimensionsTransform(dim, padded, True), index)
        return cls(index)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        super().add(vectors)
        if self._vectors is None or isinstance(self._vectors, list):
            self._vectors = (self._vectors or []) + [vectors.astype(np.float16)]

    def attach_vectors(self, vectors) -> None:
        self._vectors = vectors

    def _refine_source(self):
        if isinstance(self._vectors, list):
            self._vectors = [np.concatenate(self._vectors)] if len(self._vectors) > 1 else self._vectors
            return self._vectors[0]
        return self._vectors

    def search(self, queries, k):
        vecs = self._refine_source()
        if vecs is None or self.k_factor <= 1 or len(vecs) != len(self):
            return super().search(queries, k)
        k = max(1, min(int(k), len(self)))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, cand = super().search(queries, k * self.k_factor)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        for i, (q, c) in enumerate(zip(queries, cand, strict=True)):
            c = np.unique(c[c >= 0])  # sorted rows: sequential-ish reads of the memory map
            exact = inner_products(vecs[c], q)
            top = np.argsort(-exact, kind="stable")[:k]
            scores[i, : len(top)], rows[i, : len(top)] = exact[top], c[top]
        return scores, rows


KINDS: dict[str, type[VectorIndex]] = {
    c.kind: c for c in (FlatIndex, HNSWIndex, IVFFlatIndex, IVFSQIndex, IVFPQIndex)
}


def make_vector_index(dim: int, n_expected: int, kind: str = "auto") -> VectorIndex:
    if kind == "auto":
        kind = (
            "flat"
            if n_expected < AUTO_THRESHOLD
            else "hnsw"
            if n_expected < AUTO_IVF_THRESHOLD
            else "ivfsq"
            if n_expected < AUTO_IVFPQ_THRESHOLD
            else "ivfpq"
        )
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from auto, {', '.join(KINDS)}")
    return KINDS[kind].create(dim, n_expected)


def read_vector_index(path: Path, kind: str) -> VectorIndex:
    return KINDS[kind](faiss.read_index(str(path)))

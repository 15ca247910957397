"""One small interface over faiss indexes of unit vectors searched by inner product (cosine).

Exact search (Flat) below ``AUTO_THRESHOLD`` vectors; an HNSW graph above it, whose recall against exact
search `vlsearch eval --index hnsw` and `vlsearch bench` report. IVF-PQ is for galleries that no longer fit
in memory as float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import faiss
import numpy as np

AUTO_THRESHOLD = 50_000


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

    @abstractmethod
    def configure(self, **params) -> None:
        """Search-time knobs (efSearch, nprobe)."""


class FlatIndex(VectorIndex):
    kind = "flat"

    @classmethod
    def create(cls, dim: int) -> FlatIndex:
        return cls(faiss.IndexFlatIP(dim))

    def configure(self, **params) -> None:
        pass


class HNSWIndex(VectorIndex):
    kind = "hnsw"

    @classmethod
    def create(cls, dim: int, m: int = 32, ef_construction: int = 80, ef_search: int = 128) -> HNSWIndex:
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


class IVFPQIndex(VectorIndex):
    """Inverted lists over product-quantised codes; needs training on a sample before ``add``."""

    kind = "ivfpq"

    @classmethod
    def create(cls, dim: int, nlist: int = 1024, m: int = 32, nprobe: int = 32) -> IVFPQIndex:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = nprobe
        return cls(index)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.index.is_trained:
            self.index.train(vectors[: max(len(vectors), 39 * self.index.nlist)])
        self.index.add(vectors)

    def configure(self, nprobe: int | None = None, **_) -> None:
        if nprobe:
            self.index.nprobe = int(nprobe)


KINDS: dict[str, type[VectorIndex]] = {c.kind: c for c in (FlatIndex, HNSWIndex, IVFPQIndex)}


def make_vector_index(dim: int, n_expected: int, kind: str = "auto") -> VectorIndex:
    if kind == "auto":
        kind = "flat" if n_expected < AUTO_THRESHOLD else "hnsw"
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from auto, {', '.join(KINDS)}")
    return KINDS[kind].create(dim)


def read_vector_index(path: Path, kind: str) -> VectorIndex:
    return KINDS[kind](faiss.read_index(str(path)))

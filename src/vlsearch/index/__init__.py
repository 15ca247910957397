"""Vector indexes (one small interface, several faiss implementations) and the on-disk gallery index."""

from vlsearch.index.vectors import (
    FlatIndex,
    HNSWIndex,
    IVFPQIndex,
    VectorIndex,
    make_vector_index,
    read_vector_index,
)

__all__ = ["FlatIndex", "HNSWIndex", "IVFPQIndex", "VectorIndex", "make_vector_index", "read_vector_index"]

"""vlsearch: fast, accurate text-to-image search with transformers.

The library API is small: ``vlsearch.load(index_dir)`` returns a :class:`~vlsearch.search.engine.SearchEngine`
with ``.search(text, k)``, ``.search_image(image, k)`` and ``.add(paths)``.
"""

from vlsearch.settings import short_openmp_spin
from vlsearch.version import FORMAT_VERSION, __version__

short_openmp_spin()  # before anything loads torch (settings.py says why)

__all__ = ["FORMAT_VERSION", "__version__", "load"]


def load(index_dir=None, model=None, rerank_model=None, rerank_compact=False):
    """Open an index (default: the one `vlsearch demo` built) for searching; ``rerank_compact``: the
    re-ranker keeps ~41 KB of int8 parts per image instead of the full maps (encoders/compact.py)."""
    # imported here: the package root is the API's front door, above every layer (importing
    # `vlsearch.errors` must not load torch and the search stack)
    from vlsearch.search.engine import SearchEngine

    return SearchEngine.open(index_dir, model=model, rerank_model=rerank_model, rerank_compact=rerank_compact)

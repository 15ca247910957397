"""vlsearch: fast, accurate text-to-image search with transformers.

The library API is small: ``vlsearch.load(index_dir)`` returns a :class:`~vlsearch.search.engine.SearchEngine`
with ``.search(text, k)``, ``.search_image(image, k)`` and ``.add(paths)``.
"""

__version__ = "0.1.0"
# Bumped whenever a checkpoint, index or feature-cache layout changes incompatibly.
FORMAT_VERSION = 1


def load(index_dir=None, model=None, rerank_model=None):
    """Open an index (default: the one `vlsearch demo` built) for searching."""
    from vlsearch.search.engine import SearchEngine

    return SearchEngine.open(index_dir, model=model, rerank_model=rerank_model)

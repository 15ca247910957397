"""Re-export: the Embedder moved to `vlsearch.models.embedder` so index/ can use it; old imports keep working."""

from vlsearch.models.embedder import Embedder, check_query

__all__ = ["Embedder", "check_query"]

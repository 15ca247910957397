"""The search service (FastAPI) and its web page: ``create_app(engine)``; ``vlsearch serve`` runs it."""

from vlsearch.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]

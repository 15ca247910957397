"""The OpenAPI schema: every route's error statuses (the gate answers some before any route runs) and
the real bounds of the query parameters the routes parse themselves."""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi

from vlsearch.search.engine import MAX_K, MAX_RERANK
from vlsearch.settings import MAX_QUERY_CHARS

ERROR_BODY = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error", "detail"],
            "properties": {"error": {"type": "string"}, "detail": {}},
        }
    }
}
ERROR_TEXT = {
    400: "bad input (query, number, Host header)",
    401: "a token is needed (private library, or writing)",
    403: "writing is disabled",
    404: "not found",
    408: "the request body arrived too slowly",
    409: "the index was rebuilt with another model",
    413: "upload too large",
    415: "not an image in an allowed format",
    422: "malformed request",
    429: "too many failed token attempts",
    503: "busy or the index is unavailable (Retry-After)",
}
ERRORS = {s: {"description": ERROR_TEXT[s], "content": ERROR_BODY} for s in ERROR_TEXT if s not in (413, 415)}
UPLOAD_ERRORS = {s: {"description": ERROR_TEXT[s], "content": ERROR_BODY} for s in ERROR_TEXT}


def openapi_schema(app):
    """FastAPI's schema, with every route's error statuses (the gate answers them before routes do)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        rerank_max = MAX_RERANK if app.state.service.rerank_enabled else 0
        params = {  # what the routes' own checks accept (they parse strings, for clearer messages)
            "q": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
            "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
            "rerank": {"type": "integer", "minimum": 0, "maximum": rerank_max, "default": 0},
            "explain": {"type": "integer", "enum": [0, 1] if rerank_max else [0], "default": 0},
            "captions": {"type": "integer", "minimum": 0, "maximum": 50, "default": 5},
        }
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                for param in op.get("parameters", []):
                    if param.get("in") == "query" and param["name"] in params:
                        param["schema"] = {**params[param["name"]], "title": param["schema"].get("title", "")}
                        param["required"] = param["name"] == "q"
                responses = op.setdefault("responses", {})
                for status, spec in UPLOAD_ERRORS.items():
                    if status in (413, 415) and "requestBody" not in op:
                        continue
                    responses.setdefault(str(status), spec)
        app.openapi_schema = schema
    return app.openapi_schema

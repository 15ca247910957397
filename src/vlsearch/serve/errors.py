"""The service's error kinds and how each becomes the JSON body ``{"error": ..., "detail": ...}``.

Below the gate and the routes (both raise these), so the gate needs nothing from the app above it.
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlsearch.data.safe_decode import UnsupportedFormat
from vlsearch.errors import CheckpointError, DataError, IndexError_, QueryError, VLSearchError

log = logging.getLogger("vlsearch.serve")


def error_json(status: int, error: str, detail=None, headers: dict | None = None) -> JSONResponse:
    """Every error body the service sends: ``{"error": text, "detail": anything}``."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class Busy(Exception):
    """The bounded queue in front of the model threads is full."""


class ApiError(StarletteHTTPException):
    """An HTTP error with our JSON body. Subclasses HTTPException so FastAPI re-raises it while parsing."""

    def __init__(self, status: int, error: str, detail=None, headers: dict | None = None):
        super().__init__(status, detail=error, headers=headers)
        self.error, self.extra = error, detail


class Unavailable(Exception):
    """The index cannot be read (corrupt metadata, mismatched files): 503 with the reason."""


STATUS_OF = [
    (UnsupportedFormat, 415),
    (QueryError, 400),
    (DataError, 400),
    (IndexError_, 409),
    (CheckpointError, 409),
]


def register_error_handlers(app, service, settings) -> None:
    """Errors are always JSON ``{"error", "detail"}``: our kinds, FastAPI's and anything unexpected (500)."""

    @app.exception_handler(VLSearchError)
    async def _vlsearch_error(request, exc: VLSearchError):
        status = next((s for cls, s in STATUS_OF if isinstance(exc, cls)), 400)
        return error_json(status, str(exc), type(exc).__name__.rstrip("_"))

    @app.exception_handler(Busy)
    async def _busy(request, exc):
        return error_json(
            503,
            "the server is busy: too many searches in progress",
            {"retry_after_s": settings.retry_after, "capacity": service.pool.capacity},
            {"Retry-After": str(settings.retry_after)},
        )

    @app.exception_handler(Unavailable)
    async def _unavailable(request, exc):
        text = str(exc) if getattr(request.state, "authorised", False) else _no_paths(str(exc), service)
        return error_json(503, "the index is unavailable", text, {"Retry-After": "60"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if isinstance(exc, ApiError):
            return error_json(exc.status_code, exc.error, exc.extra, exc.headers)
        text = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        detail = None if text == exc.detail else exc.detail
        return error_json(exc.status_code, text, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()
        ]
        # a bad query-string value is bad input (400), as the routes' own checks answer it
        status = 400 if detail and all(d["loc"][:1] == ["query"] for d in detail) else 422
        return error_json(status, "invalid request: " + "; ".join(_fmt_err(e) for e in detail), detail)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_json(500, "internal error", type(exc).__name__)


def _no_paths(text: str, service) -> str:
    return text.replace(str(service.engine.path), "<index>")


def _fmt_err(e: dict) -> str:
    loc = ".".join(str(x) for x in e["loc"] if x not in ("query", "body"))
    return f"{loc or 'request'}: {e['msg']}"

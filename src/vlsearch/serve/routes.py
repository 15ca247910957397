"""The search service: a FastAPI app over one :class:`~vlsearch.search.engine.SearchEngine`.

Routes (all errors are JSON ``{"error": ..., "detail": ...}`` with a 4xx status, or 503 when busy):

    GET  /                 the web page (static/index.html; no external assets)
    GET  /search           ?q=TEXT&k=10&rerank=K&explain=1  text-to-image, optionally re-ranked and explained
    POST /search/image     multipart ``file``: similar images and matching captions
    GET  /images/{id}      an image of the index, looked up by id (or row) in the index metadata
    GET  /videos/{id}      a video of the index (range requests); ?frame=T its frame at T s (serve/videos.py)
    POST /images           multipart ``files``: add images to the index (needs the write token)
    GET  /healthz          index, re-ranker, write access and load figures
    GET  /openapi.json     the schema (and /docs)

Models and index are loaded once, before the app is made. All model work runs in a small thread pool
(``workers`` threads, so both cores are busy while the event loop only does I/O). In front of that pool
sits a bounded queue: at most ``workers + max_queue`` model requests are admitted; beyond that a
request is answered 503 with ``Retry-After`` at once instead of piling up work (serve/admission.py).
This module makes the app and holds the page, login and search routes; serve/images.py the image ones.
"""

from __future__ import annotations

import functools
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from vlsearch.data.safe_decode import allowed_text
from vlsearch.errors import QueryError
from vlsearch.search.embedder import check_query
from vlsearch.search.engine import MAX_K, MAX_RERANK, SearchEngine, check_k
from vlsearch.serve import images as image_routes
from vlsearch.serve import videos
from vlsearch.serve.encoding import (
    image_search_body,
    make_search_options,
    parse_flag,
    parse_whole,
    raw_query_param,
    search_body,
)
from vlsearch.serve.errors import ApiError, register_error_handlers
from vlsearch.serve.gate import COOKIE, Gate, Guard, Throttle, login_page, same, session_value
from vlsearch.serve.limits import MAX_EXPLAINED, ServeSettings
from vlsearch.serve.openapi import ERRORS, UPLOAD_ERRORS, openapi_schema
from vlsearch.serve.service import Service
from vlsearch.settings import MAX_QUERY_CHARS
from vlsearch.version import __version__

STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def create_app(engine: SearchEngine, settings: ServeSettings | None = None, reranker=None) -> FastAPI:
    """The service over an opened engine. ``reranker`` (optional) replaces the engine's: anything with the
    ``Reranker.rerank_text(text, keys, fast_scores, explain)`` contract."""
    settings = settings or ServeSettings()
    if reranker is not None:
        engine.reranker = reranker
        if getattr(reranker, "extractor", False) is None:  # as SearchEngine.open wires it
            reranker.extractor = engine.embedder.extractor
    service = Service(engine, settings)
    if settings.warm_up:
        service.warm_up()

    @asynccontextmanager
    async def lifespan(app):
        service.pool.start()  # again, if an earlier lifespan (a test client) shut it down
        yield
        service.pool.shutdown()

    app = FastAPI(
        title="vlsearch",
        version=__version__,
        description="Text-to-image search: a Fast dual encoder with faiss, optionally re-ranked by the Slow model.",
        lifespan=lifespan,
    )
    app.state.service = service
    throttle = Throttle()  # failed token attempts, shared by the gate and the login form

    register_error_handlers(app, service, settings)

    # -- routes --------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
        )

    @app.get("/healthz", summary="Health, index size, re-ranker and load figures", responses=ERRORS)
    async def healthz(request: Request):
        return service.health(getattr(request.state, "authorised", False))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        token = str(form.get("token") or "")
        if not settings.read_token:
            return RedirectResponse("/", status_code=303)
        if not same(token, settings.read_token):
            throttle.fail(request.client.host if request.client else "?")
            return login_page("wrong token")
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            COOKIE, session_value(settings.read_token), httponly=True, samesite="strict", path="/"
        )
        return resp

    @app.get("/search", summary="Text-to-image search", responses=ERRORS)
    async def search(
        request: Request,
        q: str | None = Query(
            None, max_length=MAX_QUERY_CHARS, description="the text query (UTF-8, at most 2000 characters)"
        ),
        k: str = Query("10", max_length=24, description=f"number of results, a whole number 1..{MAX_K}"),
        rerank: str = Query(
            "0",
            max_length=24,
            description=f"re-rank the Fast top-K with the Slow model (0 = off, at most {MAX_RERANK})",
        ),
        explain: str = Query(
            "0",
            max_length=8,
            description=f"with rerank: word-to-region heat maps for the first {MAX_EXPLAINED} results (1)",
        ),
        after: str | None = Query(
            None, max_length=64, description="taken on or after this date (2021, 2021-07, 2021-07-04)"
        ),
        before: str | None = Query(None, max_length=64, description="taken before the end of this date"),
        folder: str | None = Query(
            None, max_length=1024, description="in this folder (relative to the one indexed) or below"
        ),
        camera: str | None = Query(
            None, max_length=64, description="camera make or model contains this text"
        ),
        near: str | None = Query(None, max_length=64, description="taken within KM of LAT,LON: 'LAT,LON,KM'"),
        sort: str = Query("score", max_length=8, description="score (relevance) or date (newest first)"),
        offset: str = Query("0", max_length=24, description="skip this many results (paging)"),
        cursor: str | None = Query(None, max_length=1024, description="next_cursor of the previous page"),
        min_score: str | None = Query(None, max_length=64, description="drop results below this cosine"),
        why: str = Query(
            "0", max_length=8, description="concept tags per result (1): the ImageNet concepts behind it"
        ),
    ):
        t0 = time.perf_counter()
        raw = raw_query_param(request, "q")
        if raw is None:
            raise QueryError("missing query parameter q")
        text = check_query(raw)
        k = check_k(parse_whole(k, "k", 10))
        rerank = parse_whole(rerank, "rerank", 0)
        rerank = check_k(rerank, MAX_RERANK, "rerank") if rerank else 0
        explain = parse_flag(explain, "explain")
        why = parse_flag(why, "why")
        if explain and not rerank:
            raise QueryError("explain=1 needs rerank=K: the Slow model is what explains")
        if rerank and not service.rerank_enabled:
            raise ApiError(400, "re-ranking is not available on this server", settings.rerank_note)
        options = make_search_options(after, before, folder, camera, near, sort, offset, cursor, min_score)
        result, wait_ms = await service.pool.run(
            functools.partial(service.text_search, text, k, rerank, explain, why, **options),
            heavy=bool(rerank),
        )
        return await run_in_threadpool(
            search_body, service, result, text, k, rerank, explain, wait_ms, t0, result.concept_tags
        )

    @app.post(
        "/search/image",
        summary="Image-to-image and image-to-text search with an uploaded image",
        responses=UPLOAD_ERRORS,
    )
    async def search_image(
        file: UploadFile = File(..., description="the query image (at most 20 MB; " + allowed_text() + ")"),
        k: str = Query("10", max_length=24, description=f"number of similar images, 1..{MAX_K}"),
        captions: str = Query("5", max_length=24, description="number of matching captions, 0..50"),
    ):
        t0 = time.perf_counter()
        k = check_k(parse_whole(k, "k", 10))
        k_captions = parse_whole(captions, "captions", 0)
        k_captions = check_k(k_captions, 50, "captions") if k_captions else 0
        data = await file.read()
        (images, caps, cap_rows), wait_ms = await service.pool.run(
            service.image_search, data, k, k_captions, heavy=True
        )
        return image_search_body(images, caps, cap_rows, k, wait_ms, t0)

    image_routes.register(app, service, settings)
    videos.register(app, service, ApiError)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, max_bytes=settings.max_upload_bytes, write_token=settings.write_token)
    app.add_middleware(Gate, service=service, settings=settings, throttle=throttle)
    app.openapi = lambda: openapi_schema(app)
    return app

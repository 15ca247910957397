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
request is answered 503 with ``Retry-After`` at once instead of piling up work.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from vlsearch import __version__
from vlsearch.data.photo import BROWSER_UNSHOWN, display_jpeg
from vlsearch.data.safe_decode import UnsupportedFormat, allowed_text
from vlsearch.errors import CheckpointError, DataError, IndexError_, QueryError, VLSearchError
from vlsearch.search.embedder import check_query
from vlsearch.search.engine import MAX_K, MAX_RERANK, SearchEngine, check_k
from vlsearch.search.queries import check_min_score, check_offset, check_sort, make_filter
from vlsearch.serve.gate import Gate, Throttle, error_json
from vlsearch.settings import MAX_QUERY_CHARS

log = logging.getLogger("vlsearch.serve")

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # decoding is the cost, not the bytes: a 20 MB PNG can be 100 Mpx
MAX_UPLOAD_FILES = 32
MAX_EXPLAINED = 24  # results that carry an explanation (the page shows 24)
MAX_EXPLAINED_WORDS = 16  # words per explanation, each a 14x14 map
MAX_ID_CHARS = 1024  # longer /images ids are refused (400) before any lookup
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".heic": "image/heic",
    ".heif": "image/heif",
}
PIL_SUFFIX = {
    "HEIF": ".heic",
    "JPEG": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "WEBP": ".webp",
    "TIFF": ".tif",
}
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass
class ServeSettings:
    workers: int = 2  # model threads: one per core
    threads_per_worker: int = 1  # torch intra-op threads per model thread
    max_queue: int = 16  # admitted model requests waiting for a thread; more get 503 at once
    max_rerank_queue: int = 8  # of which heavy ones (re-rank, add images) at most
    retry_after: int = 1  # seconds, sent with 503
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    write_token: str | None = None  # POST /images is off without one
    rerank_model: str | None = None  # name shown in /healthz
    rerank_note: str = ""  # why re-ranking is off, for /healthz and the page
    page_k: int = 24  # what the web page asks for
    page_rerank: int = 30  # Fast candidates the page has the Slow model re-rank
    warm_up: bool = True
    read_token: str | None = None  # search, images and the page need it when set
    allowed_hosts: tuple[str, ...] | None = None  # Host header allowlist (None: any)
    max_bytes_in_flight: int = 4 * MAX_UPLOAD_BYTES  # request bodies being received, all requests
    body_timeout_s: float = 60.0  # a whole request body must arrive within this
    receive_idle_s: float = 15.0  # ... and no gap between its chunks longer than this
    follow_symlinks: bool | None = None  # None: as the index was built (its config)


# -- errors -----------------------------------------------------------------------------------------------
class Busy(Exception):
    """The bounded queue in front of the model threads is full."""


class ApiError(StarletteHTTPException):
    """An HTTP error with our JSON body. Subclasses HTTPException so FastAPI re-raises it while parsing."""

    def __init__(self, status: int, error: str, detail=None, headers: dict | None = None):
        super().__init__(status, detail=error, headers=headers)
        self.error, self.extra = error, detail


STATUS_OF = [
    (UnsupportedFormat, 415),
    (QueryError, 400),
    (DataError, 400),
    (IndexError_, 409),
    (CheckpointError, 409),
]


class Unavailable(Exception):
    """The index cannot be read (corrupt metadata, mismatched files): 503 with the reason."""


# -- the bounded model pool -------------------------------------------------------------------------------
def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


class Scheduler:
    """``workers`` threads running jobs by deadline: a job's deadline is its arrival time, plus
    ``heavy_delay`` seconds for heavy work, so Fast queries overtake Slow re-ranks that arrived less
    than ``heavy_delay`` before them (re-ranks still never starve). Unbounded: ModelPool bounds it."""

    def __init__(self, workers: int, threads_per_worker: int, heavy_delay: float = 0.5):
        self.heavy_delay = heavy_delay
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(
                target=self._work, args=(threads_per_worker,), name=f"vlsearch-model-{i}", daemon=True
            )
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn, heavy: bool = False) -> Future:
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the model pool is shut down")
            deadline = time.monotonic() + (self.heavy_delay if heavy else 0.0)
            heapq.heappush(self._heap, (deadline, next(self._order), future, fn))
            self._cv.notify()
        return future

    def _work(self, threads: int) -> None:
        _init_worker(threads)
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, future, fn = heapq.heappop(self._heap)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while waiting: its caller went away
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                future.set_exception(e)

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, future, _ in self._heap:
                future.cancel()
            self._heap.clear()
            self._cv.notify_all()


class ModelPool:
    """``workers`` threads for model work behind an admission counter of ``workers + max_queue``, and a
    second one for heavy work (Slow re-ranking, adding images) of ``workers + max_heavy_queue``, so a
    queue full of re-ranks cannot make every admitted request wait for seconds; and Fast work goes
    first when both wait (see Scheduler).

    The counters are only touched on the event loop thread. A slot is released when the work is really
    done (or cancelled before it started), not when the waiting request goes away, so clients that hang
    up cannot make the pool take on more than its capacity.
    """

    def __init__(self, workers: int, threads_per_worker: int, max_queue: int, max_heavy_queue: int = 8):
        self.workers = max(1, workers)
        self.capacity = self.workers + max(0, max_queue)
        self.heavy_capacity = min(self.capacity, self.workers + max(0, max_heavy_queue))
        self.threads_per_worker = threads_per_worker
        self.executor = Scheduler(self.workers, threads_per_worker)
        self.pending = 0
        self.heavy_pending = 0
        self.peak = 0
        self.served = 0
        self.shed = 0

    async def run(self, fn, *args, heavy: bool = False):
        if self.full(heavy):
            self.shed += 1
            raise Busy()
        loop = asyncio.get_running_loop()
        self.pending += 1
        self.heavy_pending += heavy
        self.peak = max(self.peak, self.pending)
        queued = time.perf_counter()

        def job():
            started = time.perf_counter()
            return fn(*args), (started - queued) * 1e3

        try:
            cf = self.executor.submit(job, heavy)
        except BaseException:
            self._release(heavy)
            raise
        cf.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._release, heavy))
        return await asyncio.wrap_future(cf)

    def start(self) -> None:
        if self.executor._closed:
            self.executor = Scheduler(self.workers, self.threads_per_worker)

    def full(self, heavy: bool = False) -> bool:
        return self.pending >= self.capacity or (heavy and self.heavy_pending >= self.heavy_capacity)

    def _release(self, heavy: bool) -> None:
        self.pending -= 1
        self.heavy_pending -= heavy
        self.served += 1

    def stats(self) -> dict:
        return {
            "workers": self.workers,
            "capacity": self.capacity,
            "in_flight": self.pending,
            "heavy_capacity": self.heavy_capacity,
            "heavy_in_flight": self.heavy_pending,
            "peak_in_flight": self.peak,
            "served": self.served,
            "shed": self.shed,
        }

    def shutdown(self) -> None:
        self.executor.shutdown()


# -- early checks on the raw request: body size and write access, before any body is read ---------------
class Guard:
    """ASGI middleware: 413 for bodies over the cap (by Content-Length at once, or while streaming), and
    401/403 for writes without the right token, both before the body is read."""

    def __init__(self, app, max_bytes: int, write_token: str | None):
        self.app, self.max_bytes, self.write_token = app, max_bytes, write_token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/images":
            denied = check_write(self.write_token, headers.get("authorization"))
            if denied is not None:
                return await denied(scope, receive, send)
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await error_json(400, "bad Content-Length header", length)(scope, receive, send)
            if n > self.max_bytes:
                return await too_large(self.max_bytes, n)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, *_too_large_text(self.max_bytes, None))
            return message

        await self.app(scope, limited, send)


def _too_large_text(limit: int, n: int | None) -> tuple[str, dict]:
    return (
        f"upload too large: the limit is {limit // (1024 * 1024)} MB",
        {"limit_bytes": limit, "content_length": n},
    )


def too_large(limit: int, n: int | None) -> JSONResponse:
    error, detail = _too_large_text(limit, n)
    return error_json(413, error, detail, {"Connection": "close"})


def check_write(token: str | None, authorization: str | None) -> JSONResponse | None:
    if not token:
        return error_json(
            403,
            "adding images is disabled",
            "start the service with --write-token TOKEN (or VLSEARCH_WRITE_TOKEN) to allow POST /images",
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return error_json(
            401,
            "missing or wrong write token",
            "send the header 'Authorization: Bearer TOKEN'",
            {"WWW-Authenticate": 'Bearer realm="vlsearch"'},
        )
    return None


# -- parsing helpers --------------------------------------------------------------------------------------
def raw_query_param(request: Request, name: str) -> str | None:
    """A query-string value decoded strictly as UTF-8 (Starlette would silently replace bad bytes)."""
    pairs = parse_qsl(
        request.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True, encoding="latin-1"
    )
    for key, value in pairs:
        if key == name:
            try:
                return value.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError as e:
                raise QueryError(f"{name} is not valid UTF-8 text") from e
    return None


def parse_flag(value: str | None, name: str) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise QueryError(f"{name} must be 0 or 1, not {value[:20]!r}")


def jsonable(x, digits: int = 4):
    """Explanations and timings come as numpy: plain JSON values, floats to ``digits`` significant digits
    (heat-map values are small: 196 of them sum to 1)."""
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist(), digits)
    if isinstance(x, dict):
        return {str(k): jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v, digits) for v in x]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        v = float(x)
        return float(f"{v:.{digits}g}") if np.isfinite(v) else None
    return x


def guard_reranker(reranker) -> None:
    """The re-ranker's image keys/values LRU (an OrderedDict) is not safe for two threads at once: run
    its ``image_kv`` under a lock (the Slow scoring itself still runs in parallel)."""
    fn = getattr(reranker, "image_kv", None)
    if fn is None or getattr(fn, "_serialized", False):
        return
    lock = threading.Lock()

    def image_kv(keys):
        with lock:
            return fn(keys)

    image_kv._serialized = True
    reranker.image_kv = image_kv


def make_search_options(after, before, folder, camera, near, sort, offset, cursor, min_score) -> dict:
    """The /search filter, sort and paging parameters, checked (QueryError -> 400)."""
    return {
        "filters": make_filter(after, before, folder, camera, near),
        "sort": check_sort(sort),
        "offset": check_offset(offset),
        "cursor": cursor or None,
        "min_score": check_min_score(min_score),
    }


def image_url(image_id: str) -> str:
    return "/images/" + quote(image_id, safe="/")


def hit_kind(hit) -> dict:
    """kind "image", or for a video its moment, file and thumbnail (vlsearch.serve.videos)."""
    if getattr(hit, "kind", "image") != "video":
        return {"kind": "image"}
    from vlsearch.serve.videos import video_fields

    return video_fields(hit)


# -- the service state: engine, freshness, uploads --------------------------------------------------------
class Service:
    def __init__(self, engine: SearchEngine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.fingerprint = engine.index.config.model_fingerprint
        self.model_name = engine.index.config.model
        self.started = time.time()
        self.pool = ModelPool(
            settings.workers, settings.threads_per_worker, settings.max_queue, settings.max_rerank_queue
        )
        self._refresh_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.stale: str | None = None  # set when the index on disk was rebuilt with another model
        self.refreshes = 0
        self._seen_index = engine.index
        self.broken: str | None = None  # the index cannot be read: searches answer 503 with this
        self.unscored = 0  # re-ranked results that kept their Fast score (image file gone)
        try:
            engine.index.check_integrity()
        except VLSearchError as e:
            self.broken = str(e)
        if engine.reranker is not None:
            guard_reranker(engine.reranker)
            if hasattr(engine.reranker, "locate"):
                engine.reranker.locate = lambda keys: self.engine.index.paths_of_keys(keys)

    @property
    def rerank_enabled(self) -> bool:
        return self.engine.reranker is not None

    @property
    def uploads_dir(self) -> Path:
        """Uploaded files live beside the index folder (the index folder itself is swapped on write)."""
        path = self.engine.path
        return path.with_name(path.name + ".uploads")

    # freshness: picks up `vlsearch index --add` by another process and our own POST /images
    def refresh(self) -> None:
        if not self._refresh_lock.acquire(blocking=False):
            return  # another thread is reopening; this request uses the index as it was
        try:
            self.engine.refresh()
            if self.engine.index is not self._seen_index:  # reopened, here or by engine.add
                self._seen_index = self.engine.index
                self.refreshes += 1
                cfg = self.engine.index.config
                if cfg.model_fingerprint != self.fingerprint:
                    self.stale = (
                        f"the index at {self.engine.path} was rebuilt with another model "
                        f"({cfg.model!r}, {cfg.model_fingerprint}); restart `vlsearch serve`"
                    )
                else:
                    self.stale = None
                log.info("index reloaded: %d images", len(self.engine.index.images))
        except VLSearchError as e:  # mid-swap or removed: keep serving what we have
            log.warning("index not reloaded: %s", e)
        except Exception as e:  # noqa: BLE001 - never let a reload take the service down
            log.warning("index not reloaded (%s: %s)", type(e).__name__, e)
        finally:
            self._refresh_lock.release()
        if self.stale:
            raise IndexError_(self.stale)
        if self.broken:
            raise Unavailable(self.broken)

    def guarded(self, fn):
        """Run index work; an unreadable index (sqlite or faiss failing under us) becomes the degraded
        state with its reason, and 503s, instead of a 500 on every request."""
        import sqlite3

        try:
            return fn()
        except sqlite3.Error as e:
            self.broken = f"the index metadata at {self.engine.path} is unreadable ({e}); rebuild it with `vlsearch index`"
            raise Unavailable(self.broken) from e

    def warm_up(self) -> None:
        """Load the lazily built backbones (and tokenizer settings) before the first user waits."""
        from PIL import Image

        self.engine.search("a warm up query", 1)
        self.engine.search_image(Image.new("RGB", (64, 64), (120, 120, 120)), 1)

    # model work (runs on a pool thread)
    def text_search(self, text: str, k: int, rerank: int, explain: bool, why: bool = False, **options):
        """Explanations cost ~200 floats per word per result: the engine ranks without them, and only
        the first MAX_EXPLAINED results are explained (the same pairs, so the same maps). With ``why``
        the concept tags are made in the same pool job (``result.concept_tags``)."""
        self.refresh()
        result = self.guarded(
            lambda: _retry_borrowed(lambda: self.engine.search(text, k, rerank=rerank, **options))
        )
        if explain:
            top = result.hits[:MAX_EXPLAINED]
            keys = [r.key for r in self.engine.index.records([h.row for h in top])]
            fast = np.array([h.fast_score for h in top], np.float32)
            _, _, maps = _retry_borrowed(
                lambda: self.engine.reranker.rerank_text(text, keys, fast, explain=True)
            )
            result.explanations = [_cap_words(m) for m in maps] + [None] * (len(result.hits) - len(top))
        self.unscored += sum(1 for h in result.hits if rerank and not np.isfinite(h.slow_score))
        result.concept_tags = self.concept_tags(text, result.hits) if why else None
        return result

    def concept_tags(self, text: str, hits) -> list:
        """Per hit, the ImageNet concepts that drove it (vlsearch.search.why); [] without a channel."""
        from vlsearch.search.why import concept_tags

        keys = [r.key for r in self.engine.index.records([h.row for h in hits])]
        try:
            return concept_tags(self.engine.embedder, text, keys)
        except KeyError:  # a feature-cache miss (index built elsewhere, pruned cache): no tags, not a 500
            return [[] for _ in keys]

    def image_search(self, data: bytes, k: int, k_captions: int):
        self.refresh()
        image = decode_upload(data)
        return self.guarded(lambda: self._image_search(image, k, k_captions))

    def _image_search(self, image, k: int, k_captions: int):
        images = self.engine.search_image(image, k)
        captions = self.engine.captions_for_image(image, k_captions) if k_captions else None
        cap_rows = {}
        if captions is not None and captions.hits:
            rows = sorted({c.image_row for c in captions.hits})
            cap_rows = dict(zip(rows, self.engine.index.records(rows), strict=True))
        return images, captions, cap_rows

    def lookup_image(self, ref: str):
        index = self.engine.index
        row = self.guarded(lambda: index.row_of_id(ref))
        if row is None and ref.isascii() and ref.isdigit() and len(ref) < 12 and int(ref) < len(index.images):
            row = int(ref)
        return None if row is None else self.guarded(lambda: index.record(row))

    def servable(self, path: Path) -> bool:
        """Inside the index's roots (or its uploads) and not through a symlink, unless the index was built
        with --follow-symlinks (or the server runs with it): a link planted in a photo folder, or an index
        entry pointing elsewhere, must not serve files from elsewhere on the machine."""
        config = self.engine.index.config
        follow = self.settings.follow_symlinks
        if follow is None:
            follow = bool(getattr(config, "follow_symlinks", False))
        if follow:
            return True
        if any(p.is_symlink() for p in [path, *path.parents][:-1] if p.name):
            return False
        roots = list(getattr(config, "roots", None) or [])
        if not roots:  # an index from before roots were recorded: the symlink rule alone
            return True
        real = path.resolve()
        return any(real.is_relative_to(Path(r)) for r in [*roots, str(self.uploads_dir.resolve())])

    def add_images(self, uploads: list[tuple[str, bytes]]) -> dict:
        """Store each upload under a content-hash name beside the index, extract its features with the
        loaded backbone, and add it to the index (atomic swap); the engine sees it at once."""
        with self._write_lock:
            self.refresh()
            folder = self.uploads_dir
            folder.mkdir(parents=True, exist_ok=True)
            saved = []
            for name, data in uploads:
                image = decode_upload(data)
                suffix = PIL_SUFFIX.get(image.format or "", ".img")
                if suffix == ".img":
                    raise QueryError(f"{name}: unsupported image format {image.format}")
                path = folder / (hashlib.sha1(data).hexdigest() + suffix)
                if not path.exists():
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                saved.append((name, path))
            before = len(self.engine.index.images)
            # the loaded backbone fills the feature cache, so add_to_index finds everything cached
            self.engine.embedder.extractor.image_keys([p for _, p in saved])
            added = self.engine.add([p for _, p in saved])
            self.refresh()
            index = self.engine.index
            out = []
            for name, path in saved:
                row = index.row_of_id(path.name)
                out.append(
                    {
                        "filename": name,
                        "id": path.name,
                        "row": row,
                        "url": image_url(path.name),
                        "new": row is not None and row >= before,
                    }
                )
            return {"added": added, "n_images": len(index.images), "images": out}

    def remove_images(self, ids: list[str]) -> list[str]:
        """Delete by id (tombstones in the index manifest); the engine sees it at once."""
        with self._write_lock:
            removed = self.engine.remove(ids)
            self.refresh()
            return removed

    def health(self, authorised: bool = False) -> dict:
        """Paths (of the index, in problems) only for a caller with a token."""
        cfg = self.engine.index.config
        problem = self.stale or self.broken
        if problem and not authorised:
            problem = problem.replace(str(self.engine.path), "<index>")
        return {
            "status": "degraded" if problem else "ok",
            "problem": problem,
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "index": {
                "path": str(self.engine.path) if authorised else None,
                "n_images": len(self.engine.index.images),
                "n_captions": cfg.n_captions,
                "model": self.model_name,
                "kind": cfg.kind,
                "source": cfg.source,
                "reloads": self.refreshes,
            },
            "rerank": {
                "enabled": self.rerank_enabled,
                "model": self.settings.rerank_model if self.rerank_enabled else None,
                "note": None if self.rerank_enabled else self.settings.rerank_note,
                "max": MAX_RERANK,
                "max_explained": MAX_EXPLAINED,
                "unscored_results": self.unscored,
            },
            "write": {"enabled": bool(self.settings.write_token)},
            "private": bool(self.settings.read_token),
            "limits": {
                "max_k": MAX_K,
                "max_upload_bytes": self.settings.max_upload_bytes,
                "page_k": self.settings.page_k,
                "page_rerank": min(self.settings.page_rerank, MAX_RERANK),
            },
            "load": self.pool.stats(),
        }


def _retry_borrowed(fn):
    """A fast tokenizer shared by threads can refuse a concurrent call ("Already borrowed"): retry once."""
    try:
        return fn()
    except RuntimeError as e:
        if "borrow" not in str(e).lower():
            raise
        time.sleep(0.005)
        return fn()


def decode_upload(data: bytes):
    """Open an uploaded image fully (truncated files fail here): allowed formats only, bounded pixels,
    scans and time (vlsearch.data.safe_decode); 415 for other formats."""
    from vlsearch.data.safe_decode import decode

    return decode(data, what="upload", max_pixels=MAX_UPLOAD_PIXELS)


def _cap_words(explanation: dict | None) -> dict | None:
    if explanation is None:
        return None
    n = MAX_EXPLAINED_WORDS
    return {**explanation, "tokens": explanation["tokens"][:n], "maps": explanation["maps"][:n]}


# -- the app ----------------------------------------------------------------------------------------------
def create_app(engine: SearchEngine, settings: ServeSettings | None = None, reranker=None) -> FastAPI:
    """The service over an opened engine. ``reranker`` (optional) replaces the engine's: anything with the
    ``Reranker.rerank_text(text, keys, fast_scores, explain)`` contract."""
    from contextlib import asynccontextmanager

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

    # errors: always JSON {"error", "detail"}
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
        from fastapi.responses import RedirectResponse

        from vlsearch.serve.gate import COOKIE, login_page, same, session_value

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
        k = check_k(k)
        rerank = check_k(rerank, MAX_RERANK, "rerank") if str(rerank).strip() not in ("", "0") else 0
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
            _search_body, service, result, text, k, rerank, explain, wait_ms, t0, result.concept_tags
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
        k = check_k(k)
        k_captions = check_k(captions, 50, "captions") if str(captions).strip() not in ("", "0") else 0
        data = await file.read()
        (images, caps, cap_rows), wait_ms = await service.pool.run(
            service.image_search, data, k, k_captions, heavy=True
        )
        return JSONResponse(
            jsonable(
                {
                    "k": k,
                    "images": [
                        {
                            "rank": i,
                            "row": h.row,
                            "id": h.id,
                            "url": image_url(h.id),
                            "score": h.score,
                            **hit_kind(h),
                        }
                        for i, h in enumerate(images.hits, 1)
                    ],
                    "captions": [
                        {
                            "rank": i,
                            "text": c.text,
                            "score": c.score,
                            "image_id": cap_rows[c.image_row].id,
                            "image_url": image_url(cap_rows[c.image_row].id),
                        }
                        for i, c in enumerate(caps.hits if caps else [], 1)
                    ],
                    "timings_ms": {
                        "images": images.timings_ms.get("total"),
                        "captions": caps.timings_ms.get("total") if caps else None,
                        "queue": wait_ms,
                        "server": (time.perf_counter() - t0) * 1e3,
                    },
                }
            )
        )

    @app.get(
        "/images/{image_id:path}",
        summary="An image of the index, by id (or row number)",
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}, **ERRORS},
    )
    async def get_image(
        image_id: str = FPath(
            ..., description=f"an image id or row (ids over {MAX_ID_CHARS} characters: 404)"
        ),
    ):
        if len(image_id) > MAX_ID_CHARS or "\x00" in image_id:
            raise ApiError(404, "no such image in the index", image_id[:200])
        rec = await run_in_threadpool(service.lookup_image, image_id)
        if rec is None:
            raise ApiError(404, "no such image in the index", image_id[:200])
        path = Path(rec.path)
        if not path.is_file() or not service.servable(path):
            raise ApiError(404, "the image file of this index entry is missing on disk", rec.id)
        if path.suffix.lower() in BROWSER_UNSHOWN:  # HEIC, TIFF: an upright JPEG the page can show
            data = await run_in_threadpool(display_jpeg, path)
            return Response(
                data,
                media_type="image/jpeg",
                headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
            )
        return FileResponse(
            path,
            media_type=IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @app.post(
        "/images",
        status_code=201,
        summary="Add images to the index (needs 'Authorization: Bearer TOKEN')",
        responses=UPLOAD_ERRORS,
    )
    async def add_images(request: Request, files: list[UploadFile] = File(..., description="image files")):
        denied = check_write(settings.write_token, request.headers.get("authorization"))
        if denied is not None:
            return denied
        if len(files) > MAX_UPLOAD_FILES:
            raise QueryError(f"at most {MAX_UPLOAD_FILES} files per request")
        uploads = [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
        bad = []
        for name, data in uploads:
            try:
                await run_in_threadpool(decode_upload, data)
            except QueryError as e:
                bad.append(
                    {"filename": name, "reason": str(e), "unsupported": isinstance(e, UnsupportedFormat)}
                )
        if bad:
            status = 415 if all(b.pop("unsupported") for b in bad) else 400
            for b in bad:
                b.pop("unsupported", None)
            raise ApiError(status, f"{len(bad)} of {len(uploads)} upload(s) are not readable images", bad)
        result, _ = await service.pool.run(service.add_images, uploads, heavy=True)
        return JSONResponse(result, status_code=201)

    @app.delete(
        "/images/{image_id:path}",
        summary="Remove an image from the index, by id (needs 'Authorization: Bearer TOKEN')",
        responses=ERRORS,
    )
    async def remove_image(request: Request, image_id: str = FPath(..., description="an image id")):
        denied = check_write(settings.write_token, request.headers.get("authorization"))
        if denied is not None:
            return denied
        if len(image_id) > MAX_ID_CHARS or "\x00" in image_id:
            raise ApiError(404, "no such image in the index", image_id[:200])
        removed, _ = await service.pool.run(service.remove_images, [image_id], heavy=True)
        if not removed:
            raise ApiError(404, "no such image in the index", image_id[:200])
        return {"removed": removed, "n_images": len(service.engine.index.images)}

    from vlsearch.serve import videos

    videos.register(app, service, ApiError)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, max_bytes=settings.max_upload_bytes, write_token=settings.write_token)
    app.add_middleware(Gate, service=service, settings=settings, throttle=throttle)
    app.openapi = lambda: _openapi(app)
    return app


def _search_body(service, result, text, k, rerank, explain, wait_ms, t0, tags=None) -> Response:
    """The /search response, built and serialised on a worker thread (explanations are big)."""
    import json

    hits = []
    explanations = result.explanations if explain else None
    for i, h in enumerate(result.hits):
        item = {
            "rank": result.offset + i + 1,
            "row": h.row,
            "id": h.id,
            "url": image_url(h.id),
            "score": h.score,
            "taken": h.taken,
            "folder": h.folder,
            "camera": h.camera,
        }
        item.update(hit_kind(h))
        if rerank:
            item["fast_score"], item["slow_score"] = h.fast_score, h.slow_score
            if not np.isfinite(h.slow_score):
                item["note"] = "not re-ranked: the image file is gone, so this keeps its Fast score"
        if explanations is not None and explanations[i] is not None:
            item["explanation"] = explanations[i]
        if tags is not None:
            item["concepts"] = [{"name": n, "weight": w} for n, w in tags[i]]
        hits.append(item)
    timings = dict(result.timings_ms)
    timings["queue"] = wait_ms
    timings["server"] = (time.perf_counter() - t0) * 1e3
    body = {
        "query": text,
        "k": k,
        "rerank": rerank,
        "n_images": len(service.engine.index.images),
        "n_matching": result.n_matching,
        "offset": result.offset,
        "next_offset": result.next_offset,
        "next_cursor": result.next_cursor,
        "results": hits,
        "timings_ms": timings,
    }
    return Response(json.dumps(jsonable(body), allow_nan=False), media_type="application/json")


def _no_paths(text: str, service) -> str:
    return text.replace(str(service.engine.path), "<index>")


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


def _openapi(app):
    """FastAPI's schema, with every route's error statuses (the gate answers them before routes do)."""
    from fastapi.openapi.utils import get_openapi

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


def _fmt_err(e: dict) -> str:
    loc = ".".join(str(x) for x in e["loc"] if x not in ("query", "body"))
    return f"{loc or 'request'}: {e['msg']}"

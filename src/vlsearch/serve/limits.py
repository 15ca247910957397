"""The service's settings and fixed limits, in one place so every serve module reads the same numbers."""

from __future__ import annotations

from dataclasses import dataclass

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # decoding is the cost, not the bytes: a 20 MB PNG can be 100 Mpx
MAX_UPLOAD_FILES = 32
MAX_EXPLAINED = 24  # results that carry an explanation (the page shows 24)
MAX_EXPLAINED_WORDS = 16  # words per explanation, each a 14x14 map
MAX_ID_CHARS = 1024  # longer /images ids are refused (400) before any lookup


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

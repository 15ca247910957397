"""What a request must pass before any route (or body parsing) sees it.

Two ASGI middlewares. Gate, outermost: the Host header against an allowlist (DNS rebinding), the read
token for a private library (Bearer header or the page's session cookie; failed attempts throttled per
client), admission for uploads before their body is read, a cap on request-body bytes in flight across
all requests (503 + Retry-After past it), and receive deadlines for the body (408). Header deadlines live
at the protocol level (:mod:`vlsearch.serve.protocol`): no ASGI code runs before headers are complete.
Guard, inside it: the per-request body cap (413) and the write token for POST /images (401/403).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass, field

from fastapi.responses import HTMLResponse, JSONResponse

from vlsearch.serve.errors import ApiError, error_json

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
COOKIE = "vlsearch_session"
PUBLIC = {"/healthz", "/login", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
MIN_TOKEN_LENGTH = 16


def session_value(token: str) -> str:
    """What the cookie holds: a MAC of the token, so the cookie is not the token itself."""
    return hmac.new(token.encode(), b"vlsearch-session-v1", hashlib.sha256).hexdigest()


def bearer(headers: dict) -> str | None:
    scheme, _, given = (headers.get("authorization") or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def cookie(headers: dict, name: str = COOKIE) -> str | None:
    for part in (headers.get("cookie") or "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def host_name(value: str | None) -> str:
    """``Host`` without its port, lower-case (``[::1]:8000`` -> ``[::1]``)."""
    host = (value or "").strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class Throttle:
    """At most ``limit`` failed token attempts per client address per ``window`` seconds."""

    limit: int = 10
    window: float = 60.0
    failures: dict = field(default_factory=dict)  # address -> (count, window start)

    def blocked(self, who: str) -> float:
        count, start = self.failures.get(who, (0, 0.0))
        left = start + self.window - time.monotonic()
        return left if count >= self.limit and left > 0 else 0.0

    def fail(self, who: str) -> None:
        now = time.monotonic()
        count, start = self.failures.get(who, (0, now))
        if now - start > self.window:
            count, start = 0, now
        self.failures[who] = (count + 1, start)
        if len(self.failures) > 10_000:  # bounded memory under a spray of addresses
            self.failures.pop(next(iter(self.failures)))


def authorised(headers: dict, read_token: str | None, write_token: str | None) -> bool:
    """A valid read or write token (header), or the page's session cookie."""
    given = bearer(headers)
    if any(same(given, t) for t in (read_token, write_token)):
        return True
    return bool(read_token) and same(cookie(headers), session_value(read_token))


def login_page(message: str = "") -> HTMLResponse:
    note = f'<p class="error">{message}</p>' if message else ""
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vlsearch: sign in</title>'
        '<link rel="stylesheet" href="/static/app.css"></head><body><main class="login">'
        "<h1>vlsearch</h1><p>This photo library is private. Enter its read token.</p>"
        f'{note}<form method="post" action="/login"><input type="password" name="token" '
        'autocomplete="current-password" aria-label="read token" required autofocus>'
        "<button type=submit>Sign in</button></form></main></body></html>"
    )
    return HTMLResponse(
        html,
        status_code=401 if message else 200,
        headers={"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'self'"},
    )


class Gate:
    """The checks above, before the app; ``service`` gives the model pool's admission state."""

    def __init__(self, app, service, settings, throttle: Throttle | None = None):
        self.app, self.service, self.s = app, service, settings
        self.throttle = throttle or Throttle()
        self.in_flight = 0  # request-body bytes reserved by requests now being received
        self.allowed = {h.lower() for h in settings.allowed_hosts} if settings.allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        if self.allowed is not None and host_name(headers.get("host")) not in self.allowed:
            return await error_json(
                400, "this Host is not served here", "start the service with --allowed-host NAME"
            )(scope, receive, send)
        who = (scope.get("client") or ("?", 0))[0]
        scope.setdefault("state", {})["authorised"] = authorised(
            headers, self.s.read_token, self.s.write_token
        )
        if self.s.read_token and not self._public(path) and not scope["state"]["authorised"]:
            wait = self.throttle.blocked(who)
            if wait:
                return await self._throttled(wait)(scope, receive, send)
            if bearer(headers) or cookie(headers):
                self.throttle.fail(who)
            if path == "/" and method in ("GET", "HEAD"):
                return await login_page()(scope, receive, send)
            return await error_json(
                401,
                "this library is private: a read token is needed",
                "send 'Authorization: Bearer TOKEN' or sign in on the page",
                {"WWW-Authenticate": 'Bearer realm="vlsearch"'},
            )(scope, receive, send)
        if path == "/login" and method == "POST":
            wait = self.throttle.blocked(who)
            if wait:
                return await self._throttled(wait)(scope, receive, send)
        if method not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if path.rstrip("/") in ("/search/image", "/images") and self.service.pool.full(heavy=True):
            self.service.pool.shed += 1
            await self._drain(receive)  # discarded, not buffered: the client can read our answer
            return await self._busy("the server is busy: too many image requests in progress")(
                scope, receive, send
            )
        try:
            length = max(0, int(headers.get("content-length") or 0))
        except ValueError:
            return await error_json(400, "bad Content-Length header", None)(scope, receive, send)
        reserved = min(length, self.s.max_upload_bytes + 1)
        if self.in_flight + reserved > self.s.max_bytes_in_flight:
            return await self._busy("the server is busy receiving other uploads")(scope, receive, send)
        self.in_flight += reserved
        extra = 0
        deadline = time.monotonic() + self.s.body_timeout_s

        async def timed_receive():
            nonlocal extra
            left = min(self.s.receive_idle_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(0.001, left))
            except TimeoutError:
                raise ApiError(
                    408,
                    "the request body arrived too slowly",
                    {"timeout_s": self.s.body_timeout_s},
                    {"Connection": "close"},
                ) from None
            if message["type"] == "http.request" and len(message.get("body", b"")) and not length:
                extra += len(message["body"])  # chunked: count what arrives
                self.in_flight += len(message["body"])
            return message

        try:
            await self.app(scope, timed_receive, send)
        finally:
            self.in_flight -= reserved + extra

    async def _drain(self, receive) -> None:
        """Read and drop up to the upload cap of a body, within the body deadline."""
        seen, deadline = 0, time.monotonic() + self.s.body_timeout_s
        while seen <= self.s.max_upload_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                return
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    def _public(self, path: str) -> bool:
        return path in PUBLIC or path.startswith("/static/")

    def _busy(self, text: str) -> JSONResponse:
        retry = self.s.retry_after
        return error_json(503, text, {"retry_after_s": retry}, {"Retry-After": str(retry)})

    def _throttled(self, wait: float) -> JSONResponse:
        secs = max(1, int(wait + 0.999))
        return error_json(
            429,
            "too many failed token attempts: wait and retry",
            {"retry_after_s": secs},
            {"Retry-After": str(secs)},
        )


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

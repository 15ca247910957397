"""uvicorn, configured for clients that are slow on purpose.

uvicorn's h11 protocol only times out idle keep-alive connections *after* a response: a socket that
connects and sends nothing, or one header byte a second, is held forever, and each one counts against
``limit_concurrency``, so a thousand of them shut everyone else out. :class:`DeadlineH11Protocol` gives
every request ``header_timeout`` seconds from its first byte (or from the connection) to finish its
headers, then closes the socket. Idle sockets cost the event loop nothing, so the connection limit is
set high (well under ``ulimit -n``); bodies get their own deadlines in :class:`~vlsearch.serve.gate.Gate`.
"""

from __future__ import annotations

import asyncio
import resource

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class DeadlineH11Protocol(H11Protocol):
    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._armed_cycle = None
        super().connection_made(transport)
        self._arm()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._armed_cycle = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()
        super().data_received(data)
        if self.cycle is not self._armed_cycle:  # a new request's headers are complete
            self._disarm()

    def _expire(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def connection_limit() -> int:
    """Connections uvicorn accepts before answering 503: most of the file-descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(256, min(16_384, soft - 256))


def uvicorn_config(app, header_timeout: float = HEADER_TIMEOUT_S, **kw):
    """The uvicorn Config every server of the project uses (the CLI and the tests)."""
    import uvicorn

    protocol = type("Protocol", (DeadlineH11Protocol,), {"header_timeout": header_timeout})
    opts = {
        "http": protocol,
        "timeout_keep_alive": 5,
        "limit_concurrency": connection_limit(),
        "backlog": 4096,
        "timeout_graceful_shutdown": 5,
    }
    opts.update(kw)
    return uvicorn.Config(app, **opts)

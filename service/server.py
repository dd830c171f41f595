"""The HTTP server settings: uvicorn on the h11 protocol with three limits uvicorn lacks or leaves
open, so a slow or oversized client cannot hold a connection:

* request headers must be complete within ``FRESHLM_HEADER_TIMEOUT_SECONDS`` of the connection
  (or of the first byte of the next request on a kept-alive one): else 408 and close. Uvicorn has
  no such timer (a request whose headers trickled in over 72 s was served), and a connection that
  never sends anything stays open forever;
* the request line and headers may take ``FRESHLM_MAX_HEADER_BYTES``: else 431 and close (the
  httptools parser uvicorn picks by default has no limit at all);
* an idle kept-alive connection is closed after ``FRESHLM_KEEP_ALIVE_SECONDS`` (uvicorn's own).

A reverse proxy in front (nginx ``client_header_timeout``, ``large_client_header_buffers``) does
the same at the edge; these hold when the service is reached directly.
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.core.config import Settings


def _reply(status: int, reason: str) -> bytes:
    body = reason.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline and a size limit on the request head."""

    header_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    linger: float = 1.0  # after a refusal: input is read and dropped this long before the close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, reason: str) -> None:
        """Reply, end our side, and close a moment later: closing with the client's unread input
        in the buffer would reset the connection and lose the reply."""
        self._disarm_head_timer()
        if self.transport.is_closing() or self._refused:
            return
        self._refused = True
        self.transport.write(_reply(status, reason))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.linger, self.transport.close)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE:  # still waiting for a complete request head
            self._refuse(408, "Request Timeout")

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.conn.their_state is h11.IDLE:  # receiving a request head: bytes up to the blank line
            self._arm_head_timer()
            pending = self.conn.trailing_data[0] + data
            if len(pending) > self.max_header_bytes and pending.find(b"\r\n\r\n", 0, self.max_header_bytes) < 0:
                self._refuse(431, "Request Header Fields Too Large")
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def server_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """The uvicorn config the service runs with (``freshlm-serve`` and the tests' live server)."""
    protocol = type("FreshLMH11Protocol", (BoundedH11Protocol,), {
        "header_timeout": settings.header_timeout_seconds, "max_header_bytes": settings.max_header_bytes})
    options = dict(host=settings.host, port=settings.port, http=protocol, timeout_keep_alive=settings.keep_alive_seconds,
                   h11_max_incomplete_event_size=settings.max_header_bytes + 1024,  # ours answers 431 first
                   log_config=None, access_log=False)  # freshlm.access logs every request with its id
    return uvicorn.Config(app, **{**options, **overrides})

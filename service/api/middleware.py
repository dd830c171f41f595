"""The request middleware (pure ASGI, outermost of the app's own): request id, the body-size limit,
the API-key check before the body is read, one error shape for any failure, access log and metrics.

It is plain ASGI rather than ``@app.middleware("http")``: an unexpected exception is answered here,
inside the request's context, so the 500 carries the request id like every other error (Starlette
answers it further out, after that context is gone), and the body is never buffered twice.

The body limit is ours rather than ``FastAPI(max_body_size=...)``: that limiter sits outside every
app middleware and replaces any response to a request whose declared length is over the limit with
a plain-text 413, so the reply could not keep the documented error shape and request id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import TooLarge, response_for
from service.core.logging import request_id_var
from service.core.security import OPEN_PATHS, authenticate, presented_key, unauthorized

access = logging.getLogger("freshlm.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


def _request_id(headers: Headers) -> str:
    given = headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state  # settings, database and metrics
        headers = Headers(scope=scope)
        request_id = _request_id(headers)
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status, started, received = 500, False, 0
        limit = state.settings.max_body_bytes

        def record() -> None:  # logged before the last byte goes out: the client never sees it first
            route = getattr(scope.get("route"), "path", "unmatched")
            state.metrics.http_requests.labels(scope["method"], route, str(status)).inc()
            access.info("%s %s %d", scope["method"], scope["path"], status,
                        extra={"method": scope["method"], "path": scope["path"], "status": status,
                               "duration_ms": round((time.perf_counter() - start) * 1000, 2)})

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record()
            await send(message)

        async def receive_limited() -> Message:  # a body without a declared length: counted as it streams in
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise TooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        try:
            try:
                await self._check(scope, headers, state)
                await self.app(scope, receive_limited, send_with_id)
            except Exception as exc:  # noqa: BLE001  every failure gets the one error shape
                if started:
                    raise
                await response_for(exc)(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

    async def _check(self, scope: Scope, headers: Headers, state) -> None:
        """Refuse an oversized body by its declared length, then find who is calling (a blocking
        SQL lookup: in a worker thread)."""
        settings = state.settings
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            raise TooLarge(f"request body of {int(length)} bytes exceeds the limit of {settings.max_body_bytes}")
        key = presented_key(headers)
        is_open = scope["path"] in OPEN_PATHS
        runtime = getattr(state, "runtime", None)
        if runtime is None:  # not started yet
            return
        try:
            principal = await anyio.to_thread.run_sync(authenticate, settings, runtime.db.read, key)
        except Exception:
            if not is_open:
                raise
            principal = None  # a probe answers even when the key lookup cannot
        if principal is None and not is_open:
            raise unauthorized()
        scope.setdefault("state", {})["principal"] = principal

"""Typed service errors and the one JSON error shape every failure becomes.

Body of every error: ``{"detail": ..., "type": ..., "request_id": ...}``. Validation errors list
what was wrong without echoing the request back: at most ``MAX_ERRORS`` entries, each input cut to
a short preview, so an error reply stays small whatever was sent (a 1 MB body of invalid documents
once produced an 11.5 MB reply). JSON out is strict: no bare NaN or Infinity.
"""

from __future__ import annotations

import json
import logging
import math

import redis
import sqlalchemy.exc
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.logging import request_id_var

log = logging.getLogger("freshlm.errors")
MAX_ERRORS = 20
PREVIEW_CHARS = 80


class ServiceError(Exception):
    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    type = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code, type = status.HTTP_404_NOT_FOUND, "not_found"


class Conflict(ServiceError):
    status_code, type = status.HTTP_409_CONFLICT, "conflict"


class TooLarge(ServiceError):
    status_code, type = status.HTTP_413_CONTENT_TOO_LARGE, "too_large"


class BadRequest(ServiceError):
    status_code, type = status.HTTP_400_BAD_REQUEST, "bad_request"


class Invalid(ServiceError):
    """A value outside what this deployment allows (a configured cap), said in one sentence."""
    status_code, type = status.HTTP_422_UNPROCESSABLE_CONTENT, "validation_error"


class Unauthorized(ServiceError):
    status_code, type = status.HTTP_401_UNAUTHORIZED, "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="freshlm"'}


class Forbidden(ServiceError):
    status_code, type = status.HTTP_403_FORBIDDEN, "forbidden"


class Unavailable(ServiceError):
    status_code, type = status.HTTP_503_SERVICE_UNAVAILABLE, "unavailable"
    headers = {"Retry-After": "5"}


class ClientGone(ServiceError):
    """The client disconnected while its question waited or decoded: its work was dropped. Logged
    as 499 (nginx's "client closed request"); nobody reads the reply."""
    status_code, type = 499, "client_closed_request"

    def __init__(self, detail: str = "the client disconnected") -> None:
        super().__init__(detail)


class DeadlineExceeded(ServiceError):
    status_code, type = status.HTTP_504_GATEWAY_TIMEOUT, "deadline_exceeded"


def _finite(value):
    """``value`` with non-finite floats as strings: strict JSON parsers reject bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    """Strict JSON (no NaN), non-ASCII escaped: an echoed invalid input (lone surrogates) still renders."""

    def render(self, content) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, default=str,
                          separators=(",", ":")).encode()


def error_body(detail, type_: str) -> dict:
    return {"detail": detail, "type": type_, "request_id": request_id_var.get()}


def preview(value):
    """A short stand-in for an echoed input: scalars as they are, text and containers cut short."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[: PREVIEW_CHARS * 4]).decode("utf-8", "replace")
    elif not isinstance(value, str):
        value = json.dumps(_finite(value), ensure_ascii=False, default=str)
    return value if len(value) <= PREVIEW_CHARS else value[:PREVIEW_CHARS] + "..."


def validation_details(errors) -> list:
    out = []
    for err in list(errors)[:MAX_ERRORS]:
        err = {k: v for k, v in dict(err).items() if k != "ctx"}  # ctx may hold exception objects
        if "input" in err:
            err["input"] = preview(err["input"])
        out.append(err)
    if len(errors) > MAX_ERRORS:
        out.append({"type": "truncated", "loc": [], "msg": f"{len(errors) - MAX_ERRORS} more errors not shown"})
    return out


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def response_for(exc: Exception) -> SafeJSONResponse:
    """The error response of any exception (an unexpected one is logged and is a 500)."""
    if isinstance(exc, ServiceError):
        return SafeJSONResponse(error_body(exc.detail, exc.type), status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        return SafeJSONResponse(error_body(validation_details(exc.errors()), "validation_error"), status_code=422)
    if isinstance(exc, StarletteHTTPException):
        return SafeJSONResponse(error_body(exc.detail, _HTTP_TYPES.get(exc.status_code, "http_error")),
                                status_code=exc.status_code, headers=exc.headers)
    return response_for(as_service_error(exc))


def as_service_error(exc: Exception) -> ServiceError:
    """An exception as the error a caller gets: a store that is down is a 503 (retry), anything
    else unexpected a 500 naming only the class. The reason goes to the log, never to the caller."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        log.error("redis unavailable: %s", exc)
        return Unavailable("the memory bank (Redis) is unavailable")
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        log.error("database unavailable: %s", exc)
        return Unavailable("the database is unavailable")
    log.error("unhandled error", exc_info=exc)
    return ServiceError(f"internal error ({exc.__class__.__name__})")


def install_error_handlers(app: FastAPI) -> None:
    """Typed errors raised by routes. Anything else reaches the request middleware
    (``service.api.middleware``), which answers it with the same shape and the request id."""
    async def handle(_request: Request, exc: Exception):
        return response_for(exc)

    for kind in (ServiceError, RequestValidationError, StarletteHTTPException, redis.exceptions.ConnectionError,
                 redis.exceptions.TimeoutError, sqlalchemy.exc.OperationalError):
        app.add_exception_handler(kind, handle)

"""Typed service errors and the handlers that turn every failure into one JSON error shape.

Body of every error: ``{"detail": ..., "type": ..., "request_id": ...}``.
"""

from __future__ import annotations

import json
import logging

import redis
import sqlalchemy.exc
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.logging import request_id_var

log = logging.getLogger("freshlm.errors")


class ServiceError(Exception):
    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR
    type = "internal_error"

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


class Unauthorized(ServiceError):
    status_code, type = status.HTTP_401_UNAUTHORIZED, "unauthorized"


class Forbidden(ServiceError):
    status_code, type = status.HTTP_403_FORBIDDEN, "forbidden"


class Unavailable(ServiceError):
    status_code, type = status.HTTP_503_SERVICE_UNAVAILABLE, "unavailable"


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an echoed invalid input (lone surrogates) still renders."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, default=str, separators=(",", ":")).encode()


def error_body(detail, type_: str) -> dict:
    return {"detail": detail, "type": type_, "request_id": request_id_var.get()}


def _json_safe(errors: list) -> list:
    out = []
    for err in errors:
        err = dict(err)
        err.pop("ctx", None)  # may hold exception objects
        if isinstance(err.get("input"), (bytes, bytearray)):
            err["input"] = err["input"].decode("utf-8", "replace")
        out.append(err)
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return SafeJSONResponse(error_body(exc.detail, exc.type), status_code=exc.status_code,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        return SafeJSONResponse(error_body(_json_safe(exc.errors()), "validation_error"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return SafeJSONResponse(error_body(exc.detail, "http_error"), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(_request: Request, exc: Exception):
        log.error("redis unavailable: %s", exc)
        return SafeJSONResponse(error_body(f"the memory bank (Redis) is unavailable: {exc}", "unavailable"),
                                status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _database_down(_request: Request, exc: Exception):
        log.error("database unavailable: %s", exc)
        return SafeJSONResponse(error_body("the database is unavailable", "unavailable"), status_code=503,
                                headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return SafeJSONResponse(error_body(f"internal error ({exc.__class__.__name__})", "internal_error"), status_code=500)

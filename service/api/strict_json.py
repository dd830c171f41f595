"""Request bodies are strict JSON (RFC 8259): UTF-8, and no NaN or Infinity.

FastAPI's own parsing answers a non-UTF-8 body with 400 "There was an error parsing the body" and
accepts ``NaN`` (Python's ``json`` does), which then came back in the error reply as a bare NaN no
strict parser reads. Routes with bodies use ``StrictJSONRoute``: such bodies are 422 validation
errors like any other malformed JSON, before FastAPI parses them.
"""

from __future__ import annotations

import json

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _invalid(position: int, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "json_invalid", "loc": ("body", position), "msg": message, "input": {}}])


def check_strict_json(body: bytes) -> None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(exc.start, "the body is not valid UTF-8") from None
    try:
        json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _invalid(exc.pos, f"JSON decode error: {exc.msg}") from None
    except ValueError as exc:  # NaN, Infinity, -Infinity
        raise _invalid(0, str(exc)) from None


class StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            body = await request.body()  # read once; FastAPI's handler gets it from the same request
            if body and _is_json(request):
                check_strict_json(body)
            return await handler(request)

        return strict

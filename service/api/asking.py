"""What ``POST /ask`` and ``POST /v1/chat/completions`` share: the per-request limits, preparing a
question, and turning its events into one answer or a server-sent event stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from service.answerer import Answer, Answerer, Submitted
from service.core.config import Settings
from service.core.errors import ClientGone, Invalid, ServiceError, TooLarge, error_body
from service.metrics import Metrics

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


async def submit_question(answerer: Answerer, settings: Settings, tenant: str, question: str, strategy: str,
                          top_k: int | None, max_new_tokens: int | None) -> Submitted:
    """Check the request's limits, prepare the question (retrieval, pinned version) and queue it.
    Every refusal happens here, before a response starts (a stream's status is already 200)."""
    deadline = time.monotonic() + settings.ask_deadline_seconds
    if len(question) > settings.max_question_chars:
        raise TooLarge(f"question of {len(question)} characters exceeds the limit of {settings.max_question_chars}")
    tokens = answerer.question_tokens(question)
    if tokens > settings.max_question_tokens:
        raise TooLarge(f"question of {tokens} tokens exceeds the limit of {settings.max_question_tokens}")
    if top_k is not None and top_k > settings.max_top_k:
        raise Invalid(f"top_k {top_k} exceeds the limit of {settings.max_top_k}")
    if max_new_tokens is not None and max_new_tokens > settings.max_answer_tokens:
        raise Invalid(f"max_new_tokens {max_new_tokens} exceeds the limit of {settings.max_answer_tokens}")
    prepared = await run_in_threadpool(answerer.prepare, tenant, question, strategy, top_k,
                                       max_new_tokens or settings.max_new_tokens)
    return answerer.submit(prepared, deadline)


async def whole_answer(answerer: Answerer, submitted: Submitted, request: Request, metrics: Metrics) -> Answer:
    """Wait for the answer; a client that disconnects meanwhile withdraws its question."""
    start = time.perf_counter()
    async for kind, value in answerer.events(submitted, request.is_disconnected):
        if kind == "done":
            metrics.ask_seconds.labels(value.strategy).observe(time.perf_counter() - start)
            return value
    raise ClientGone()


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def event_stream(answerer: Answerer, submitted: Submitted, metrics: Metrics,
                 render: Callable[[str, object], list[str]]) -> StreamingResponse:
    """A server-sent event stream of the answer: ``render(kind, value)`` turns each event (and an
    error as ``("error", body)``) into SSE messages. A client that disconnects cancels the
    generator (Starlette), which withdraws the question from the scheduler."""
    async def body() -> AsyncIterator[str]:
        start = time.perf_counter()
        try:
            async for kind, value in answerer.events(submitted):
                if kind == "done":
                    metrics.ask_seconds.labels(value.strategy).observe(time.perf_counter() - start)
                for message in render(kind, value):
                    yield message
        except ServiceError as exc:  # after the 200 went out, an error is the stream's last event
            for message in render("error", {**error_body(exc.detail, exc.type), "status": exc.status_code}):
                yield message

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

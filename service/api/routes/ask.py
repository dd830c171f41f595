"""Answer questions about the tenant's ingested documents, with bounded work per request."""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.deps import AnswererDep, MetricsDep, SettingsDep, TenantDep
from service.api.schemas import AskIn, AskOut, SupportingDocument, errors
from service.api.strict_json import StrictJSONRoute
from service.core.errors import Invalid, TooLarge

router = APIRouter(tags=["ask"], route_class=StrictJSONRoute)


@router.post("/ask", response_model=AskOut, responses=errors(400, 413, 422, 503, 504))
async def ask(body: AskIn, tenant: TenantDep, answerer: AnswererDep, settings: SettingsDep, metrics: MetricsDep):
    """Answer a question with the chosen strategy; the response says which components were used,
    the supporting documents with scores, the adapter version the whole answer ran on, and timings.

    Work per request is bounded: the question's length in characters and tokens, `top_k` and
    `max_new_tokens` have configured caps, retrieved passages are cut to fit the prompt budget, and
    the answer has a deadline (`FRESHLM_ASK_DEADLINE_SECONDS`): 503 if the model stayed busy with
    other questions until then, 504 if decoding ran into it."""
    deadline = time.monotonic() + settings.ask_deadline_seconds
    if len(body.question) > settings.max_question_chars:
        raise TooLarge(f"question of {len(body.question)} characters exceeds the limit of {settings.max_question_chars}")
    tokens = answerer.question_tokens(body.question)
    if tokens > settings.max_question_tokens:
        raise TooLarge(f"question of {tokens} tokens exceeds the limit of {settings.max_question_tokens}")
    if body.top_k is not None and body.top_k > settings.max_top_k:
        raise Invalid(f"top_k {body.top_k} exceeds the limit of {settings.max_top_k}")
    if body.max_new_tokens is not None and body.max_new_tokens > settings.max_answer_tokens:
        raise Invalid(f"max_new_tokens {body.max_new_tokens} exceeds the limit of {settings.max_answer_tokens}")
    start = time.perf_counter()
    result = await run_in_threadpool(
        answerer.answer, tenant, body.question, body.strategy, body.top_k,
        body.max_new_tokens or settings.max_new_tokens, deadline,
    )
    metrics.ask_seconds.labels(result.strategy).observe(time.perf_counter() - start)
    return AskOut(
        answer=result.answer,
        strategy=result.strategy,
        documents=[SupportingDocument(id=p.doc_id, score=p.score, passage=p.text) for p in result.passages],
        memory_documents=result.memory_documents,
        memory_fallback=result.memory_fallback,
        adapter_version=result.adapter_version,
        timings=result.timings,
    )

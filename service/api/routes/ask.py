"""Answer questions about the ingested documents."""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.api.deps import AnswererDep, MetricsDep, SettingsDep
from service.api.schemas import AskIn, AskOut, ErrorOut, SupportingDocument
from service.core.errors import TooLarge

router = APIRouter(tags=["ask"])


@router.post("/ask", response_model=AskOut, responses={
    400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
    503: {"model": ErrorOut}})
async def ask(body: AskIn, answerer: AnswererDep, settings: SettingsDep, metrics: MetricsDep):
    """Answer a question with the chosen strategy; the response says which components were used,
    the supporting documents with scores, the adapter version the whole answer ran on, and timings."""
    if len(body.question) > settings.max_question_chars:
        raise TooLarge(f"question of {len(body.question)} characters exceeds the limit of {settings.max_question_chars}")
    start = time.perf_counter()
    result = await run_in_threadpool(
        answerer.answer, body.question, body.strategy, body.top_k,
        body.max_new_tokens or settings.max_new_tokens,
    )
    metrics.ask_seconds.labels(result.strategy).observe(time.perf_counter() - start)
    return AskOut(
        answer=result.answer,
        strategy=result.strategy,
        documents=[SupportingDocument(id=p.doc_id, score=p.score, passage=p.text) for p in result.passages],
        memory_documents=result.memory_documents,
        adapter_version=result.adapter_version,
        timings=result.timings,
    )

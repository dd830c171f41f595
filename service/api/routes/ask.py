"""Answer questions about the ingested documents."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.api.deps import AnswererDep, SettingsDep
from service.api.schemas import AskIn, AskOut, ErrorOut, SupportingDocument

router = APIRouter(tags=["ask"])


@router.post("/ask", response_model=AskOut, responses={413: {"model": ErrorOut}, 422: {"model": ErrorOut}})
def ask(body: AskIn, answerer: AnswererDep, settings: SettingsDep):
    """Retrieve the best passages (BM25), put them in the prompt, and return a short answer."""
    if len(body.question) > settings.max_question_chars:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"question of {len(body.question)} characters exceeds the limit of {settings.max_question_chars}",
        )
    result = answerer.answer(
        body.question,
        top_k=body.top_k or settings.rag_top_k,
        max_new_tokens=body.max_new_tokens or settings.max_new_tokens,
    )
    return AskOut(
        answer=result.answer,
        strategy=result.strategy,
        documents=[SupportingDocument(id=p.doc_id, score=p.score, passage=p.text) for p in result.passages],
        timings=result.timings,
    )

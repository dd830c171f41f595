"""Answer questions about the tenant's ingested documents, with bounded work per request, as one
reply or as a stream of server-sent events."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.answerer import Answer
from service.api.asking import event_stream, sse, submit_question, whole_answer
from service.api.deps import AnswererDep, MetricsDep, SettingsDep, TenantDep
from service.api.schemas import AskIn, AskOut, SupportingDocument, errors
from service.api.strict_json import StrictJSONRoute

router = APIRouter(tags=["ask"], route_class=StrictJSONRoute)

_STREAM_DOC = {
    "description": "the answer (`stream: false`), or with `stream: true` a `text/event-stream`: `token` events "
                   "(`{\"text\"}`: the decoded text as it grows, before the short answer is extracted), then one "
                   "`done` event (the same body as the JSON reply) or one `error` event (`{detail, type, "
                   "request_id, status}`)",
    "content": {"text/event-stream": {"schema": {  # one server-sent event (OpenAPI 3.1: the per-event schema)
        "type": "object", "required": ["data"],
        "properties": {"event": {"type": "string", "enum": ["token", "done", "error"]},
                       "data": {"type": "string", "contentMediaType": "application/json"}}}}},
}


def ask_out(result: Answer) -> AskOut:
    return AskOut(
        answer=result.answer,
        strategy=result.strategy,
        documents=[SupportingDocument(id=p.doc_id, score=p.score, passage=p.text) for p in result.passages],
        memory_documents=result.memory_documents,
        memory_fallback=result.memory_fallback,
        adapter_version=result.adapter_version,
        update_documents=result.update_documents,
        timings=result.timings,
    )


def _render(kind: str, value) -> list[str]:
    if kind == "token":
        return [sse("token", {"text": value})]
    if kind == "done":
        return [sse("done", ask_out(value).model_dump(mode="json"))]
    return [sse("error", value)]


@router.post("/ask", response_model=AskOut, responses={200: _STREAM_DOC, **errors(400, 413, 422, 503, 504)})
async def ask(body: AskIn, request: Request, tenant: TenantDep, answerer: AnswererDep, settings: SettingsDep,
              metrics: MetricsDep):
    """Answer a question with the chosen strategy; the response says which components were used,
    the supporting documents with scores, the adapter version the whole answer ran on, and timings
    (retrieval, queue wait, first token, generation, and how many questions decoded together).

    Concurrent questions decode together in batches (`FRESHLM_MAX_BATCH_ASKS`). Work per request is
    bounded: the question's length in characters and tokens, `top_k` and `max_new_tokens` have
    configured caps, retrieved passages are cut to fit the prompt budget, at most
    `FRESHLM_MAX_WAITING_ASKS` questions wait for the model (then 503 with `Retry-After`), and the
    answer has a deadline (`FRESHLM_ASK_DEADLINE_SECONDS`): 503 if the model stayed busy with other
    questions until then, 504 if decoding ran into it. A client that disconnects withdraws its
    question."""
    submitted = await submit_question(answerer, settings, tenant, body.question, body.strategy, body.top_k,
                                      body.max_new_tokens)
    if body.stream:
        return event_stream(answerer, submitted, metrics, _render)
    return ask_out(await whole_answer(answerer, submitted, request, metrics))

"""OpenAI-compatible endpoints, so existing clients and tools (the official ``openai`` client, chat
UIs, evaluation kits) ask FreshLM unchanged: ``POST /v1/chat/completions`` (with and without
``stream``) and ``GET /v1/models``. Same keys and tenants as ``/ask``, the same scheduler.

The question is the last user message (earlier turns are not used: FreshLM answers questions about
its documents, not conversations). The strategy is the model name (``freshlm`` = ``auto``,
``freshlm:rag``, ``freshlm:mac+rag``, ...) or the extra field ``strategy`` (``extra_body`` in the
client), which wins. Decoding is greedy: sampling parameters are accepted and ignored. Provenance
(documents, memory entries, adapter version, strategy, timings) is the extra field ``freshlm`` of
the completion, and of the last chunk of a stream.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.adapters import store
from service.answerer import Answer
from service.api.asking import event_stream, submit_question, whole_answer
from service.api.deps import AnswererDep, MetricsDep, SettingsDep, TenantDep
from service.api.routes.ask import ask_out
from service.api.schemas import Strategy, errors
from service.api.strict_json import StrictJSONRoute
from service.core.errors import Invalid
from training.pipeline import COMPONENTS, strategy_name

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJSONRoute)
MODEL = "freshlm"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionIn(BaseModel):
    """OpenAI's chat-completion request; fields FreshLM does not use (temperature, top_p, ...) are
    accepted and ignored (decoding is greedy)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "freshlm:rag", "messages": [{"role": "user", "content": "Who approved the harbour bridge?"}]}]})

    model: str = Field(description="`freshlm` (the default strategy) or `freshlm:<strategy>`, see GET /v1/models")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=512, description="answer tokens (limit: FRESHLM_MAX_ANSWER_TOKENS)")
    max_completion_tokens: int | None = Field(None, ge=1, le=512, description="same as max_tokens (newer name)")
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    strategy: Strategy | None = Field(None, description="FreshLM extra: overrides the strategy of the model name")
    top_k: int | None = Field(None, ge=1, le=20, description="FreshLM extra: passages to retrieve")


def _strategy(body: ChatCompletionIn) -> str:
    name, _, strategy = body.model.partition(":")
    if name != MODEL and body.strategy is None:
        raise Invalid(f"unknown model {body.model!r}: use {MODEL!r} or '{MODEL}:<strategy>' (GET /v1/models)")
    return body.strategy or strategy or "auto"


def _question(body: ChatCompletionIn) -> str:
    for message in reversed(body.messages):
        if message.role != "user":
            continue
        content = message.content
        if isinstance(content, list):  # content parts: the text ones
            content = "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
        if content and content.strip():
            return content
    raise Invalid("the messages need a user message with text: it is the question")


def _provenance(result: Answer) -> dict:
    return ask_out(result).model_dump(mode="json")


def _finish_reason(result: Answer, max_new_tokens: int) -> str:
    return "length" if result.completion_tokens >= max_new_tokens else "stop"


_COMPLETION_DOC = {
    "description": "a `chat.completion` (`stream: false`), or with `stream: true` a `text/event-stream` of "
                   "`chat.completion.chunk` objects (`data: {...}`), ending with `data: [DONE]` (or `data: {\"error\"}`)",
    "content": {"application/json": {"schema": {"type": "object", "required": ["id", "object", "choices"]}},
                "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                 "properties": {"data": {"type": "string"}}}}},
}


@router.post("/chat/completions", responses={200: _COMPLETION_DOC, **errors(400, 413, 422, 503, 504)})
async def chat_completions(body: ChatCompletionIn, request: Request, tenant: TenantDep, answerer: AnswererDep,
                           settings: SettingsDep, metrics: MetricsDep):
    """A chat completion answering the last user message from the tenant's documents (memory,
    adapter, retrieval as the model name or `strategy` says); `stream: true` gives OpenAI's
    `chat.completion.chunk` events ending with `data: [DONE]`."""
    max_new_tokens = body.max_completion_tokens or body.max_tokens
    strategy = _strategy(body)
    if strategy not in Strategy.__args__:
        raise Invalid(f"unknown strategy {strategy!r} in the model name: see GET /v1/models")
    submitted = await submit_question(answerer, settings, tenant, _question(body), strategy, body.top_k,
                                      max_new_tokens)
    limit = submitted.prepared.max_new_tokens
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        result = await whole_answer(answerer, submitted, request, metrics)
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                             "finish_reason": _finish_reason(result, limit)}],
                "usage": {"prompt_tokens": 0, "completion_tokens": result.completion_tokens,
                          "total_tokens": result.completion_tokens},
                "freshlm": _provenance(result)}

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    first = [True]

    def render(kind: str, value) -> list[str]:
        out = []
        if first[0] and kind != "error":
            out.append(chunk({"role": "assistant", "content": ""}))
            first[0] = False
        if kind == "token":
            out.append(chunk({"content": value}))
        elif kind == "done":
            out += [chunk({}, _finish_reason(value, limit), freshlm=_provenance(value)), "data: [DONE]\n\n"]
        else:
            out.append(f"data: {json.dumps({'error': {'message': value['detail'], 'type': value['type'], 'code': value['status']}})}\n\n")
        return out

    return event_stream(answerer, submitted, metrics, render)


@router.get("/models")
async def models(tenant: TenantDep, answerer: AnswererDep, settings: SettingsDep):
    """The models a client can name: `freshlm` (the default strategy) and `freshlm:<strategy>` for
    each combination of the components deployed for this tenant, with the base model and the
    active knowledge configuration (adapter version, memory) in the extra field `freshlm`."""
    def describe() -> dict:
        available = answerer.available(tenant)
        with answerer.sessions() as session:
            version = store.active_version(session, tenant)
        mac = answerer.mac_for(tenant)
        return {"available": available, "version": version,
                "memory_entries": len(mac.bank) if mac is not None else None,
                "auto": strategy_name(answerer.default_components(tenant))}

    state = await run_in_threadpool(describe)
    names = ["auto"] + [strategy_name(set(s.split("+"))) for s in Strategy.__args__
                        if s not in ("auto", "none") and set(s.split("+")) <= state["available"]] + ["none"]
    knowledge = {"base_model": settings.base_model, "auto": state["auto"], "components": [c for c in COMPONENTS if c in state["available"]],
                 "adapter_version": state["version"], "memory_entries": state["memory_entries"]}
    return {"object": "list", "data": [
        {"id": MODEL if name == "auto" else f"{MODEL}:{name}", "object": "model", "created": 0, "owned_by": "freshlm",
         "root": settings.base_model, "freshlm": {**knowledge, "strategy": name}} for name in names]}

"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import unicodedata
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.db import TENANT_ID_PATTERN

DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$"
Strategy = Literal["auto", "none", "rag", "mac", "adapter", "mac+rag", "adapter+rag", "mac+adapter", "mac+adapter+rag"]
Status = Literal["pending", "ingested", "failed", "deleted"]
# invisible characters that make a text look non-empty: whitespace, controls, format (zero-width
# space, joiners, BOM, word joiner) and separators
_INVISIBLE = {"Cc", "Cf", "Zs", "Zl", "Zp"}


class ErrorOut(BaseModel):
    detail: str | list = Field(description="what was wrong (validation errors: a list, inputs cut to a short preview)")
    type: str
    request_id: str | None


def errors(*codes: int) -> dict[int, dict]:
    """OpenAPI responses: the error shape for ``codes`` and for what any API route may answer (401
    without a valid key, 413 for a body over the limit, 503 when the database is away)."""
    return {code: {"model": ErrorOut} for code in sorted({*codes, 401, 413, 503})}


def _valid_text(value: str | None, what: str) -> str | None:
    if value is None:
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 (lone surrogate)") from None
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    return value


def _visible(value: str, what: str) -> str:
    if all(unicodedata.category(c) in _INVISIBLE for c in value):
        raise ValueError(f"{what} must not be empty or only whitespace / invisible characters")
    return value


def _iso_date(value: str | None) -> str | None:
    """An ISO-8601 date or date-time, stored as given."""
    if value is None:
        return value
    for parse in (date.fromisoformat, datetime.fromisoformat):
        try:
            parse(value)
            return value
        except ValueError:
            pass
    raise ValueError("published_at must be an ISO-8601 date or date-time, e.g. 2031-03-04 or 2031-03-04T09:30:00Z")


class DocumentIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "demo-001",
                    "title": "Harbour bridge approved",
                    "text": "The Norvale city council approved the new harbour bridge on Tuesday.",
                    "source": "Norvale Gazette",
                    "published_at": "2031-03-04",
                }
            ]
        },
    )

    id: str = Field(pattern=DOC_ID_PATTERN, description="client-chosen, unique id")
    text: str = Field(min_length=1, description="the document text (limit: FRESHLM_MAX_DOCUMENT_CHARS)")
    title: str | None = Field(None, max_length=500)
    source: str | None = Field(None, max_length=500)
    published_at: str | None = Field(None, max_length=40, description="ISO-8601 date or datetime")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return _visible(_valid_text(value, "text"), "text")

    @field_validator("title", "source")
    @classmethod
    def _utf8(cls, value: str | None) -> str | None:
        return _valid_text(value, "field")

    @field_validator("published_at")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        return _iso_date(_valid_text(value, "published_at"))


class DocumentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn] = Field(min_length=1, description="a batch (limit: FRESHLM_MAX_BATCH_DOCUMENTS)")


class DocumentStatus(BaseModel):
    id: str
    status: Status
    created: bool = Field(description="false: the same document was already stored (a no-op)")
    status_url: str = Field(description="path of the document's status, relative to the service")


class DocumentsAccepted(BaseModel):
    documents: list[DocumentStatus]


class DocumentOut(BaseModel):
    id: str
    status: Status
    failure_reason: str | None = Field(None, description="why the last ingest attempt failed")
    attempts: int
    title: str | None
    source: str | None
    published_at: str | None
    memory_written: bool = Field(description="a MAC memory entry was written for it")
    adapter_version: str | None = Field(None, description="the adapter version its update created")
    adapter_note: str | None = None
    created_at: datetime
    ingested_at: datetime | None
    deleted_at: datetime | None
    text: str | None = Field(None, description="omitted in listings; erased on delete")


class DocumentPage(BaseModel):
    items: list[DocumentOut]
    total: int
    offset: int
    limit: int
    next_offset: int | None


class DocumentDeleted(BaseModel):
    id: str
    status: Literal["deleted"]
    memory_entry_removed: bool
    update_entry_removed: bool = Field(False, description="its update-bank entry was removed (FRESHLM_UPDATE_BANK): "
                                                          "no answer applies its update any more")
    absorbed_by_live_adapter: bool = Field(description="the live adapter carries an update made from this document")
    live_adapter_version: str | None
    rebuild_adapter_url: str | None = Field(None, description="path to POST (admin) to rebuild the adapter without it")


class AskIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"question": "Who approved the harbour bridge?", "strategy": "auto"}]},
    )

    question: str = Field(min_length=1, description="limits: FRESHLM_MAX_QUESTION_CHARS, FRESHLM_MAX_QUESTION_TOKENS")
    strategy: Strategy = Field("auto", description="auto: the default strategy (FRESHLM_STRATEGY) over the deployed components; see /readyz")
    top_k: int | None = Field(None, ge=1, le=20, description="passages to retrieve (limit: FRESHLM_MAX_TOP_K)")
    max_new_tokens: int | None = Field(None, ge=1, le=512, description="answer tokens (limit: FRESHLM_MAX_ANSWER_TOKENS)")
    stream: bool = Field(False, description="true: server-sent events, tokens as they decode, then the answer")

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return _visible(_valid_text(value, "question"), "question")


class SupportingDocument(BaseModel):
    id: str
    score: float
    passage: str


class AskOut(BaseModel):
    answer: str
    strategy: str = Field(description="the components actually used, e.g. 'mac+rag' or 'none'")
    documents: list[SupportingDocument] = Field(description="retrieved passages with their retriever's scores "
                                                            "(BM25, cosine, or fused rank score)")
    memory_documents: list[str] = Field(description="MAC memory entries the answer read")
    memory_fallback: list[str] = Field(default_factory=list,
                                       description="documents whose memory entry was gone (evicted from Redis): "
                                                   "answered from their text, the entry is being rebuilt")
    adapter_version: str | None = Field(description="the adapter version the whole answer ran on")
    update_documents: list[str] = Field(default_factory=list,
                                        description="update-bank entries applied for this answer (FRESHLM_UPDATE_BANK): "
                                                    "the documents whose single update the adapter carried")
    timings: dict[str, float] = Field(description="seconds: retrieve, queue (waiting for a batch), first_token "
                                                  "(arrival to first token), generate; batch_size: questions decoded "
                                                  "together")


class AdapterOut(BaseModel):
    version: str
    parent: str | None
    kind: str
    documents: list[str]
    metrics: dict[str, Any]
    created_at: datetime
    active: bool
    weights_available: bool = Field(description="false once pruned (FRESHLM_ADAPTER_KEEP_VERSIONS): no longer activatable")


class AdaptersOut(BaseModel):
    active: str | None
    versions: list[AdapterOut]


class ArtifactOut(BaseModel):
    id: str = Field(description="content address: sha256 of kind, base-model fingerprint, config and weights")
    kind: str
    parent: str | None = Field(description="the artifact it was trained from")
    source: str = Field(description="shipped | configured | retrain")
    base_model: str | None
    metrics: dict[str, Any]
    created_at: datetime
    active: bool = Field(description="the version the operator activated for its kind")
    serving: bool = Field(description="the version answers use now (a MAC switch moves it once the new bank is complete)")
    path: str | None = Field(None, description="the artifact directory (the operator only)")


class ArtifactPointerOut(BaseModel):
    kind: str
    active: str
    serving: str
    switch: dict[str, Any] | None = Field(description="a switch under way: target, entries written / total")


class ArtifactsOut(BaseModel):
    pointers: list[ArtifactPointerOut]
    artifacts: list[ArtifactOut]


class Accepted(BaseModel):
    detail: str


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"id": "acme", "name": "Acme News"}]})

    id: str = Field(pattern=TENANT_ID_PATTERN, description="lower-case letters, digits and dashes")
    name: str | None = Field(None, max_length=200)


class TenantOut(BaseModel):
    id: str
    name: str | None
    created_at: datetime


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "admin"] = Field("user", description="admin: delete, rollback, rebuild, manage the tenant's keys")


class KeyOut(BaseModel):
    id: str = Field(description="public id of the key (to revoke it)")
    tenant: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


class IssuedKey(KeyOut):
    key: str = Field(description="the key itself: shown once, stored only as a hash")

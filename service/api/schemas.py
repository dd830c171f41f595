"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$"


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
    text: str = Field(min_length=1)
    title: str | None = Field(None, max_length=500)
    source: str | None = Field(None, max_length=500)
    published_at: str | None = Field(None, max_length=40, description="ISO-8601 date or datetime")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must not be empty or whitespace only")
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        return value


class DocumentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn] = Field(min_length=1)


class DocumentStatus(BaseModel):
    id: str
    status: Literal["ingested", "unchanged", "pending", "failed"]
    status_url: str


class DocumentsAccepted(BaseModel):
    documents: list[DocumentStatus]


class DocumentOut(BaseModel):
    id: str
    title: str | None
    source: str | None
    published_at: str | None
    status: str
    text: str


class AskIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"question": "Who approved the harbour bridge?"}]},
    )

    question: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, le=20, description="passages to retrieve")
    max_new_tokens: int | None = Field(None, ge=1, le=512)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("question must not be empty or whitespace only")
        return value


class SupportingDocument(BaseModel):
    id: str
    score: float
    passage: str


class AskOut(BaseModel):
    answer: str
    strategy: Literal["rag", "none"]
    documents: list[SupportingDocument]
    timings: dict[str, float]


class ErrorOut(BaseModel):
    detail: str | list

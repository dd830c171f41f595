"""Plain records shared by data loaders, methods, evaluation and the service."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One ingestible text: a news article, a SQuAD paragraph, a RealTimeQA evidence passage."""

    id: str
    text: str
    title: str | None = None
    source: str | None = None
    published_at: str | None = None  # ISO-8601 date or datetime, as given


@dataclass(frozen=True)
class Question:
    """A question with its gold answers and the documents that support it."""

    id: str
    question: str
    answers: tuple[str, ...]
    doc_ids: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None  # multiple choice (RealTimeQA)
    answer_index: int | None = None  # index into ``choices``
    date: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

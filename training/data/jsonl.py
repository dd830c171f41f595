"""Our own plain format for users' data: one JSON object per line, either a document or a question.

    {"type": "document", "id": "d1", "text": "...", "title": "...", "published_at": "2024-05-01"}
    {"type": "question", "id": "q1", "question": "...", "answers": ["..."], "doc_ids": ["d1"],
     "choices": ["...", "..."], "answer_index": 0}

Documents are streamed in file order. ``title``, ``source``, ``published_at``, ``choices`` and
``answer_index`` are optional.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from training.data.evalset import EvalSet
from training.types import Document, Question


class DatasetFormatError(ValueError):
    """A line of a JSONL dataset is not a valid document or question."""


def _document(record: dict) -> Document:
    return Document(str(record["id"]), str(record["text"]), title=record.get("title"),
                    source=record.get("source"), published_at=record.get("published_at"))


def _question(record: dict) -> Question:
    answers = record["answers"]
    if isinstance(answers, str):
        answers = [answers]
    choices = record.get("choices")
    return Question(
        id=str(record["id"]), question=str(record["question"]),
        answers=tuple(str(a) for a in answers), doc_ids=tuple(str(d) for d in record.get("doc_ids", ())),
        choices=tuple(choices) if choices else None, answer_index=record.get("answer_index"),
        date=record.get("date"),
    )


def load_jsonl_dataset(path: str | Path, name: str | None = None, split: str = "all") -> EvalSet:
    path = Path(path)
    documents: list[Document] = []
    questions: list[Question] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record.get("type")
            if kind == "document":
                documents.append(_document(record))
            elif kind == "question":
                questions.append(_question(record))
            else:
                raise DatasetFormatError(f"'type' must be 'document' or 'question', got {kind!r}")
        except (json.JSONDecodeError, KeyError, TypeError, DatasetFormatError) as exc:
            raise DatasetFormatError(f"{path}:{lineno}: {exc}") from exc
    known = {d.id for d in documents}
    for q in questions:
        missing = [d for d in q.doc_ids if d not in known]
        if missing:
            raise DatasetFormatError(f"{path}: question {q.id!r} names unknown documents {missing}")
    return EvalSet(name or path.stem, split, documents, questions, meta={"source": str(path)})


def write_jsonl_dataset(evalset: EvalSet, path: str | Path) -> None:
    """Write an ``EvalSet`` in the same format (used to export any dataset for inspection)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for d in evalset.documents:
            out.write(json.dumps({"type": "document", **asdict(d)}) + "\n")
        for q in evalset.questions:
            record = {k: v for k, v in asdict(q).items() if k != "meta" and v is not None}
            out.write(json.dumps({"type": "question", **record}) + "\n")


def load_jsonl_questions(path: str | Path) -> list[Question]:
    """The question lines of a JSONL file (documents, if any, are skipped): an operator's
    question/answer file about documents that live elsewhere (the retrain job's ``--qa-file``)."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record.get("type") == "question":
                out.append(_question(record))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetFormatError(f"{path}:{lineno}: {exc}") from exc
    return out

"""RealTimeQA weekly quiz files (``YYYY/*_qa.jsonl``): each question's evidence paragraph becomes a
document of the stream, dated by the question's week.

The gold answer is ``choices[int(answer[0])]``; questions are scored both by generation (F1/EM on
that answer text) and by ranking the choices (accuracy).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from training.data.evalset import EvalSet
from training.data.html_text import strip_html
from training.types import Document, Question

log = logging.getLogger(__name__)


def _iso_date(value: str) -> str:
    return value.replace("/", "-")


def qa_files(path: str | Path) -> list[Path]:
    """The weekly files under ``path`` (a year folder, the folder of years, or one file), in date order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*_qa.jsonl"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *_qa.jsonl files under {path}")
    return files


def parse_question(record: dict) -> Question | None:
    """A ``Question`` from one RealTimeQA record, or ``None`` if it has no usable answer."""
    choices = tuple(strip_html(c) for c in record.get("choices") or ())
    try:
        index = int(record["answer"][0])
        answer = choices[index]
    except (KeyError, IndexError, ValueError, TypeError):
        return None
    return Question(
        id=str(record["question_id"]),
        question=strip_html(record["question_sentence"]),
        answers=(answer,),
        choices=choices,
        answer_index=index,
        date=_iso_date(record.get("question_date", "")) or None,
        meta={"source": record.get("question_source"), "url": record.get("question_url")},
    )


def load_realtimeqa(path: str | Path, split: str = "all") -> EvalSet:
    """All weekly files under ``path`` as a stream of evidence documents in date order.

    Identical evidence paragraphs become one document. Questions without evidence or without a
    valid answer are skipped (and counted in ``meta``).
    """
    documents: dict[str, Document] = {}
    questions: list[Question] = []
    skipped = {"no_evidence": 0, "no_answer": 0}
    for file in qa_files(path):
        for line in file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            question = parse_question(record)
            if question is None:
                skipped["no_answer"] += 1
                continue
            evidence = strip_html(record.get("evidence") or "")
            if not evidence:
                skipped["no_evidence"] += 1
                continue
            doc_id = "rtqa-" + hashlib.sha1(evidence.encode()).hexdigest()[:12]
            documents.setdefault(
                doc_id,
                Document(doc_id, evidence, source=record.get("question_source"),
                         published_at=question.date),
            )
            questions.append(
                Question(question.id, question.question, question.answers, (doc_id,),
                         question.choices, question.answer_index, question.date, question.meta)
            )
    if any(skipped.values()):
        log.info("realtimeqa: skipped %s", skipped)
    return EvalSet("realtimeqa", split, list(documents.values()), questions,
                   meta={"source": str(path), "skipped": skipped})

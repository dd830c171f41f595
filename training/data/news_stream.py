"""The 2024 news-article stream (``2024-articles.jsonl.gz``): full articles in publication order,
linked to the RealTimeQA questions they answer. Most articles answer no question: they are the
distractors a deployed system would ingest too."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from training.data.evalset import EvalSet
from training.data.realtimeqa import parse_question, qa_files
from training.types import Document, Question


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def load_news_stream(
    articles_path: str | Path, questions_path: str | Path | None = None, split: str = "2024"
) -> EvalSet:
    """Articles sorted by publication date (ties keep file order). With ``questions_path`` (a
    RealTimeQA folder), the questions named in the articles' ``question_ids`` are attached with the
    linking articles as their documents."""
    documents: list[Document] = []
    doc_ids_by_question: dict[str, list[str]] = {}
    with _open_text(Path(articles_path)) as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            text = (record.get("text") or "").strip()
            if not text:
                continue
            doc_id = record["url"]
            documents.append(Document(
                doc_id, text, title=record.get("title"), source="news",
                published_at=(record.get("publish_date") or "").replace("/", "-") or None,
            ))
            for qid in record.get("question_ids") or ():
                doc_ids_by_question.setdefault(str(qid), []).append(doc_id)
    documents.sort(key=lambda d: d.published_at or "")
    questions: list[Question] = []
    if questions_path is not None:
        for file in qa_files(questions_path):
            for line in file.read_text(encoding="utf-8").splitlines():
                q = parse_question(json.loads(line)) if line.strip() else None
                if q is None or q.id not in doc_ids_by_question:
                    continue
                questions.append(Question(q.id, q.question, q.answers,
                                          tuple(doc_ids_by_question[q.id]), q.choices,
                                          q.answer_index, q.date, q.meta))
    return EvalSet("news-stream", split, documents, questions,
                   meta={"source": str(articles_path),
                         "linked_questions": len(doc_ids_by_question)})

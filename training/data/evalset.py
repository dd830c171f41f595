"""The unit every loader returns and the harness consumes: an ordered stream of documents and the
questions asked about them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from training.types import Document, Question


@dataclass
class EvalSet:
    name: str
    split: str
    documents: list[Document]  # in stream order
    questions: list[Question]
    meta: dict = field(default_factory=dict)

    def documents_by_id(self) -> dict[str, Document]:
        return {d.id: d for d in self.documents}

    def questions_about(self, doc_ids: set[str]) -> list[Question]:
        """Questions all of whose supporting documents are in ``doc_ids``."""
        return [q for q in self.questions if q.doc_ids and set(q.doc_ids) <= doc_ids]

    def subset(
        self, max_documents: int | None = None, max_questions: int | None = None, seed: int = 0
    ) -> "EvalSet":
        """The first ``max_documents`` documents of the stream with only the questions about them,
        then at most ``max_questions`` of those (a seeded sample, kept in stream order)."""
        docs = self.documents if max_documents is None else self.documents[:max_documents]
        kept = {d.id for d in docs}
        questions = self.questions_about(kept)
        if max_questions is not None and len(questions) > max_questions:
            chosen = set(random.Random(seed).sample(range(len(questions)), max_questions))
            questions = [q for i, q in enumerate(questions) if i in chosen]
        return EvalSet(self.name, self.split, list(docs), questions, dict(self.meta))

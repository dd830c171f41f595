"""BM25 retrieval over passages of documents (the `rag_bm25` method and the service's `rag`)."""

from __future__ import annotations

from dataclasses import dataclass

import bm25s
import numpy as np

from training.types import Document


@dataclass(frozen=True)
class Passage:
    doc_id: str
    text: str
    score: float = 0.0


def split_passages(doc: Document, max_words: int = 120, overlap: int = 30) -> list[Passage]:
    """Overlapping word windows, so a long article can contribute only its relevant part."""
    words = doc.text.split()
    if len(words) <= max_words:
        return [Passage(doc.id, doc.text.strip())]
    step = max_words - overlap
    return [
        Passage(doc.id, " ".join(words[start : start + max_words]))
        for start in range(0, max(len(words) - overlap, 1), step)
    ]


def _tokenize(texts: list[str]):
    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


class BM25Index:
    """An immutable BM25 index; rebuild it (cheap: ~1 s per 10^4 passages) when documents change."""

    def __init__(self, documents: list[Document], max_words: int = 120) -> None:
        self.passages = [p for doc in documents for p in split_passages(doc, max_words)]
        self._retriever: bm25s.BM25 | None = None
        if self.passages:
            self._retriever = bm25s.BM25()
            self._retriever.index(_tokenize([p.text for p in self.passages]), show_progress=False)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int = 3, min_score_ratio: float = 0.0) -> list[Passage]:
        """Top-k passages with a positive score, best first.

        ``min_score_ratio`` drops passages scoring below that fraction of the best one: a small
        model answers better from one clearly relevant passage than from it plus distractors.
        """
        if self._retriever is None or k <= 0:
            return []
        query_tokens = _tokenize([query])
        if not any(len(ids) for ids in query_tokens.ids):
            return []
        k = min(k, len(self.passages))
        indices, scores = self._retriever.retrieve(query_tokens, k=k, show_progress=False)
        hits = []
        for idx, score in zip(np.asarray(indices[0]), np.asarray(scores[0])):
            if score > 0:
                p = self.passages[int(idx)]
                hits.append(Passage(p.doc_id, p.text, float(score)))
        return [h for h in hits if h.score >= min_score_ratio * hits[0].score] if hits else hits

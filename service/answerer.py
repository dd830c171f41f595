"""The retrieval-augmented answer pipeline: BM25 over stored documents -> prompt -> short answer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.db import DocumentRecord, corpus_version
from training.generation import generate_answer
from training.prompts import qa_messages
from training.retrieval import BM25Index, Passage
from training.types import Document


@dataclass
class Answer:
    answer: str
    strategy: str
    passages: list[Passage]
    timings: dict[str, float] = field(default_factory=dict)


class RagAnswerer:
    """Owns the base model and a BM25 index that is rebuilt when the stored corpus changes."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sessions: sessionmaker[Session],
        min_score_ratio: float = 0.5,
    ) -> None:
        self.min_score_ratio = min_score_ratio
        self.model = model
        self.tokenizer = tokenizer
        self.sessions = sessions
        self._index = BM25Index([])
        self._index_version: tuple | None = None
        self._index_lock = threading.Lock()
        # One generation at a time: on CPU parallel generate calls only contend for the same cores.
        self._generate_lock = threading.Lock()

    def index(self) -> BM25Index:
        with self.sessions() as session:
            version = corpus_version(session)
            with self._index_lock:
                if version != self._index_version:
                    rows = session.scalars(select(DocumentRecord).where(DocumentRecord.status == "ingested"))
                    docs = [Document(r.id, r.text, title=r.title) for r in rows]
                    self._index = BM25Index(docs)
                    self._index_version = version
                return self._index

    def answer(self, question: str, top_k: int, max_new_tokens: int) -> Answer:
        start = time.perf_counter()
        passages = self.index().search(question, k=top_k, min_score_ratio=self.min_score_ratio)
        retrieved = time.perf_counter()
        messages = qa_messages(question, [p.text for p in passages] or None)
        with self._generate_lock:
            text = generate_answer(self.model, self.tokenizer, messages, max_new_tokens=max_new_tokens)
        done = time.perf_counter()
        strategy = "rag" if passages else "none"
        timings = {"retrieve_seconds": retrieved - start, "generate_seconds": done - retrieved}
        return Answer(text, strategy, passages, timings)

"""The answer pipeline: strategies ``mac``, ``adapter``, ``rag`` (and combinations), ``none``.

* ``rag``: BM25 over the ingested documents, the best passages go in the prompt.
* ``mac``: the question reads its top-k MAC memory entries (key/values in front of the prompt).
* ``adapter``: generation through the live adapter version, pinned for the whole request.
* ``auto``: every component that is available (rag only when a passage matches).

One generation runs at a time: on a CPU, parallel generate calls only contend for the same cores;
adapter loading shares the same lock, so no generation ever sees an adapter being added.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service import adapter_store
from service.core.errors import BadRequest
from service.db import DocumentRecord, corpus_version
from service.live_adapter import LiveAdapters
from service.mac_memory import MacRuntime
from training.generation import generate_answer
from training.prompts import qa_messages
from training.retrieval import BM25Index, Passage
from training.types import Document

COMPONENTS = ("mac", "adapter", "rag")


@dataclass
class Answer:
    answer: str
    strategy: str
    passages: list[Passage]
    adapter_version: str | None
    memory_documents: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def parse_strategy(strategy: str) -> set[str] | None:
    """``auto`` -> None (decide per question); ``none`` -> {}; else the named components."""
    if strategy == "auto":
        return None
    if strategy == "none":
        return set()
    parts = strategy.split("+")
    if not parts or any(p not in COMPONENTS for p in parts) or len(set(parts)) != len(parts):
        raise BadRequest(f"unknown strategy {strategy!r}: use auto, none, or a '+'-joined set of {COMPONENTS}")
    return set(parts)


class Answerer:
    """Owns the base model, the BM25 index (rebuilt when the corpus changes) and the adapters."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sessions: sessionmaker[Session],
        adapters: LiveAdapters,
        mac: MacRuntime | None = None,
        min_score_ratio: float = 0.5,
    ) -> None:
        self.model, self.tokenizer, self.sessions = model, tokenizer, sessions
        self.adapters, self.mac = adapters, mac
        self.min_score_ratio = min_score_ratio
        self._index = BM25Index([])
        self._index_version: tuple | None = None
        self._index_lock = threading.Lock()

    def index(self) -> BM25Index:
        with self.sessions() as session:
            version = corpus_version(session)
            if version == self._index_version:
                return self._index
            rows = list(session.scalars(select(DocumentRecord).where(DocumentRecord.status == "ingested")))
        with self._index_lock:
            if version != self._index_version:
                self._index = BM25Index([Document(r.id, r.text, title=r.title) for r in rows])
                self._index_version = version
            return self._index

    def available(self) -> set[str]:
        out = {"rag"}
        if self.mac is not None:
            out.add("mac")
        with self.sessions() as session:
            if adapter_store.active_version(session) is not None:
                out.add("adapter")
        return out

    def answer(self, question: str, strategy: str, top_k: int, max_new_tokens: int) -> Answer:
        start = time.perf_counter()
        wanted = parse_strategy(strategy)
        available = self.available()
        if wanted is not None and not wanted <= available:
            missing = ", ".join(sorted(wanted - available))
            raise BadRequest(f"strategy {strategy!r} needs {missing}, which this deployment does not have "
                             f"(available: {', '.join(sorted(available))}); see /readyz")
        with self.sessions() as session:
            version = adapter_store.active_version(session)  # pinned for the whole request
        use = set(available) if wanted is None else set(wanted)
        passages: list[Passage] = []
        if "rag" in use:
            passages = self.index().search(question, k=top_k, min_score_ratio=self.min_score_ratio)
            if wanted is None and not passages:
                use.discard("rag")
        if "mac" in use and len(self.mac.bank) == 0 and wanted is None:
            use.discard("mac")
        if "adapter" not in use:
            version = None
        retrieved = time.perf_counter()
        texts = [p.text for p in passages] if "rag" in use else None
        memory_ids: list[str] = []
        with self.adapters.lock:
            name = self.adapters.ensure(version) if version is not None else None
            if "mac" in use:
                if name is not None:  # the base model's LoRA layers read the pinned version
                    with self.adapters.peft.base_model._enable_peft_forward_hooks(adapter_names=[name]):
                        text, memory_ids = self.mac.answer(self.model, self.tokenizer, question, texts, max_new_tokens)
                else:
                    text, memory_ids = self.mac.answer(self.model, self.tokenizer, question, texts,
                                                       max_new_tokens, head=self.mac.head)
            else:
                kwargs = {"adapter_names": [name]} if name else {}
                if name is None and self.adapters.peft is not None:
                    kwargs = {"adapter_names": ["__base__"]}
                text = generate_answer(self.adapters.model, self.tokenizer, qa_messages(question, texts),
                                       max_new_tokens=max_new_tokens, **kwargs)
        done = time.perf_counter()
        used = "+".join(c for c in COMPONENTS if c in use) or "none"
        return Answer(text, used, passages if "rag" in use else [], version, memory_ids,
                      {"retrieve_seconds": retrieved - start, "generate_seconds": done - retrieved})

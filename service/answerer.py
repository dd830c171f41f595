"""The service's side of the answer pipeline (``training.pipeline``): which components a request
uses, the BM25 index over the ingested documents, the adapter version pinned for the request.

* ``auto``: the default strategy (``FRESHLM_STRATEGY``, chosen on the validation streams)
  restricted to what is deployed; retrieval only when a passage matches, memory only when the bank
  has entries.
* an explicit strategy (``mac``, ``adapter``, ``rag``, ``none`` or a ``+`` combination): exactly those
  components; one that is not deployed is a 400.

Generation is ``training.pipeline.generate``, the call the harness's ``pipeline:<strategy>`` and
``auto`` methods measure. One generation runs at a time: on a CPU, parallel generate calls only
contend for the same cores; adapter loading shares the same lock, so no generation ever sees an
adapter being added.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service import documents
from service.adapters import store
from service.adapters.live import LiveAdapters
from service.core.errors import BadRequest
from service.db import corpus_version
from training.mac.runtime import MacRuntime
from training.pipeline import PipelineConfig, generate, parse_strategy, strategy_name
from training.retrieval import BM25Index, Passage
from training.types import Document


@dataclass
class Answer:
    answer: str
    strategy: str
    passages: list[Passage]
    adapter_version: str | None
    memory_documents: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Answerer:
    """Owns the answering model, the BM25 index (rebuilt when the corpus changes) and the adapters."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sessions: sessionmaker[Session],
        adapters: LiveAdapters,
        config: PipelineConfig,
        mac: MacRuntime | None = None,
    ) -> None:
        self.model, self.tokenizer, self.sessions = model, tokenizer, sessions
        self.adapters, self.mac, self.config = adapters, mac, config
        self._index = BM25Index([])
        self._index_version: tuple | None = None
        self._index_lock = threading.Lock()

    def index(self) -> BM25Index:
        with self.sessions() as session:
            version = corpus_version(session)
            if version == self._index_version:
                return self._index
            rows = documents.ingested(session)
        with self._index_lock:
            if version != self._index_version:
                docs = [Document(r.id, r.text, title=r.title) for r in rows]
                self._index = BM25Index(docs, self.config.rag_passage_words)
                self._index_version = version
            return self._index

    def available(self) -> set[str]:
        out = {"rag"}
        if self.mac is not None:
            out.add("mac")
        with self.sessions() as session:
            if store.active_version(session) is not None:
                out.add("adapter")
        return out

    def default_components(self) -> set[str]:
        """What ``auto`` uses: the configured default strategy, restricted to what is deployed."""
        return parse_strategy(self.config.strategy) & self.available()

    def answer(self, question: str, strategy: str, top_k: int | None, max_new_tokens: int) -> Answer:
        start = time.perf_counter()
        try:
            wanted = parse_strategy(strategy)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        available = self.available()
        if wanted is not None and not wanted <= available:
            missing = ", ".join(sorted(wanted - available))
            raise BadRequest(f"strategy {strategy!r} needs {missing}, which this deployment does not have "
                             f"(available: {', '.join(sorted(available))}); see /readyz")
        with self.sessions() as session:
            version = store.active_version(session)  # pinned for the whole request
        use = self.default_components() if wanted is None else set(wanted)
        passages: list[Passage] = []
        if "rag" in use:
            passages = self.index().search(question, k=top_k or self.config.rag_top_k,
                                           min_score_ratio=self.config.rag_min_score_ratio)
            if wanted is None and not passages:
                use.discard("rag")
        if "mac" in use and wanted is None and len(self.mac.bank) == 0:
            use.discard("mac")
        if "adapter" not in use:
            version = None
        retrieved = time.perf_counter()
        texts = [p.text for p in passages] if "rag" in use and passages else None
        with self.adapters.lock:
            name = self.adapters.ensure(version) if version is not None else None
            model, kwargs, hooks = self.model, {}, contextlib.nullcontext()
            if self.adapters.peft is not None:  # per-request adapter: never a global set_adapter (PEFT #804)
                model = self.adapters.peft
                kwargs = {"adapter_names": [name or "__base__"]}
                if "mac" in use:  # MAC calls the model directly: the pinned version via PEFT's forward hooks
                    hooks = self.adapters.peft.base_model._enable_peft_forward_hooks(adapter_names=kwargs["adapter_names"])
                    model, kwargs = self.adapters.base, {}
            with hooks:
                ((text, memory_ids),) = generate(model, self.tokenizer, [question], [texts], max_new_tokens,
                                                 mac=self.mac if "mac" in use else None,
                                                 adapter_active=name is not None, **kwargs)
        done = time.perf_counter()
        return Answer(text, strategy_name(use), passages if "rag" in use else [], version, memory_ids,
                      {"retrieve_seconds": retrieved - start, "generate_seconds": done - retrieved})

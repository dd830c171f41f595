"""The service's side of the answer pipeline (``training.pipeline``): which components a request
uses, the tenant's retrieval index and memory bank, the adapter version pinned for the request,
and the request's deadline.

* ``auto``: the default strategy (``FRESHLM_STRATEGY``, chosen on the validation streams)
  restricted to what is deployed; retrieval only when a passage matches, memory only when the bank
  has entries.
* an explicit strategy (``mac``, ``adapter``, ``rag``, ``none`` or a ``+`` combination): those
  components; one that is not deployed is a 400. The answer reports what was actually used: a
  retrieval that found nothing is not reported as ``rag``.

Generation is ``training.pipeline.generate``, the call the harness's ``pipeline:<strategy>`` and
``auto`` methods measure. One generation runs at a time: on a CPU, parallel generate calls only
contend for the same cores; adapter loading shares the same lock, so no generation ever sees an
adapter being added. A request waits for the model at most until its deadline (then 503), and
decoding stops at the deadline (then 504).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.adapters import store
from service.adapters.live import LiveAdapters
from service.core.errors import BadRequest, DeadlineExceeded, TooLarge, Unavailable
from service.corpus_index import CorpusIndex
from training.generation import GenerationTimeout
from training.mac.runtime import MacRuntime
from training.pipeline import PipelineConfig, PromptTooLong, generate, parse_strategy, strategy_name
from training.retrieval import Passage


@dataclass
class Answer:
    answer: str
    strategy: str
    passages: list[Passage]
    adapter_version: str | None
    memory_documents: list[str] = field(default_factory=list)
    memory_fallback: list[str] = field(default_factory=list)  # entries gone (evicted): answered from their text
    timings: dict[str, float] = field(default_factory=dict)


class Answerer:
    """Answers a tenant's questions with the shared model, that tenant's index, memory and adapter."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sessions: sessionmaker[Session],
        adapters: LiveAdapters,
        config: PipelineConfig,
        index: CorpusIndex,
        mac_for: Callable[[str], MacRuntime | None] = lambda tenant: None,
    ) -> None:
        self.model, self.tokenizer, self.sessions = model, tokenizer, sessions
        self.adapters, self.config, self.index, self.mac_for = adapters, config, index, mac_for

    def question_tokens(self, question: str) -> int:
        return len(self.tokenizer(question, add_special_tokens=False)["input_ids"])

    def available(self, tenant: str) -> set[str]:
        out = {"rag"}
        if self.mac_for(tenant) is not None:
            out.add("mac")
        with self.sessions() as session:
            if store.active_version(session, tenant) is not None:
                out.add("adapter")
        return out

    def default_components(self, tenant: str) -> set[str]:
        """What ``auto`` uses: the configured default strategy, restricted to what is deployed."""
        return parse_strategy(self.config.strategy) & self.available(tenant)

    def answer(self, tenant: str, question: str, strategy: str, top_k: int | None, max_new_tokens: int,
               deadline: float) -> Answer:
        """``deadline``: a ``time.monotonic()`` value the answer must be done by."""
        start = time.perf_counter()
        try:
            wanted = parse_strategy(strategy)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        available = self.available(tenant)
        if wanted is not None and not wanted <= available:
            missing = ", ".join(sorted(wanted - available))
            raise BadRequest(f"strategy {strategy!r} needs {missing}, which this deployment does not have "
                             f"(available: {', '.join(sorted(available))}); see /readyz")
        with self.sessions() as session:
            version = store.active_version(session, tenant)  # pinned for the whole request
        use = self.default_components(tenant) if wanted is None else set(wanted)
        passages: list[Passage] = []
        if "rag" in use:
            passages = self.index.search(tenant, question, k=top_k or self.config.rag_top_k)
            if not passages:
                use.discard("rag")
        mac = self.mac_for(tenant) if "mac" in use else None
        if mac is not None and wanted is None and len(mac.bank) == 0:
            use.discard("mac")
            mac = None
        if "adapter" not in use:
            version = None
        retrieved = time.perf_counter()
        texts = [p.text for p in passages] if passages else None
        if not self.adapters.lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise Unavailable("the model is busy with other questions and this one's deadline passed while "
                              "it waited; retry later")
        try:
            name = self.adapters.ensure(version) if version is not None else None
            model, kwargs, hooks = self.model, {}, contextlib.nullcontext()
            if self.adapters.peft is not None:  # per-request adapter: never a global set_adapter (PEFT #804)
                model = self.adapters.peft
                kwargs = {"adapter_names": [name or "__base__"]}
                if mac is not None:  # MAC calls the model directly: the pinned version via PEFT's forward hooks
                    hooks = self.adapters.peft.base_model._enable_peft_forward_hooks(adapter_names=kwargs["adapter_names"])
                    model, kwargs = self.adapters.base, {}
            with hooks:
                ((text, memory_ids, fallback_ids),) = generate(model, self.tokenizer, [question], [texts], max_new_tokens, mac=mac,
                                                 adapter_active=name is not None,
                                                 max_prompt_tokens=self.config.max_prompt_tokens,
                                                 deadline=deadline, **kwargs)
        except GenerationTimeout:
            raise DeadlineExceeded("the answer did not finish within the request deadline "
                                   "(FRESHLM_ASK_DEADLINE_SECONDS); ask for fewer max_new_tokens or retry") from None
        except PromptTooLong as exc:
            raise TooLarge(str(exc)) from None
        finally:
            self.adapters.lock.release()
        if mac is not None and not memory_ids and not fallback_ids:
            use.discard("mac")
        done = time.perf_counter()
        return Answer(text, strategy_name(use), passages, version, memory_ids, fallback_ids,
                      {"retrieve_seconds": retrieved - start, "generate_seconds": done - retrieved})

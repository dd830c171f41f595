"""The service's side of the answer pipeline (``training.pipeline``): which components a request
uses, the tenant's retrieval index and memory bank, the adapter version pinned for the request,
and the request's deadline.

* ``auto``: the default strategy (``FRESHLM_STRATEGY``, chosen on the validation streams)
  restricted to what is deployed; retrieval only when a passage matches, memory only when the bank
  has entries.
* an explicit strategy (``mac``, ``adapter``, ``rag``, ``none`` or a ``+`` combination): those
  components; one that is not deployed is a 400. The answer reports what was actually used: a
  retrieval that found nothing is not reported as ``rag``.

With the update bank (``FRESHLM_UPDATE_BANK``) the ``adapter`` component is the question's
update-bank entries applied for this request (no adapter version; the answer lists the entries in
``update_documents``); it is not read together with MAC memory (a 400; ``auto`` keeps MAC).

Generation is ``training.pipeline.generate``, the call the harness's ``pipeline:<strategy>`` and
``auto`` methods measure, run by the ask scheduler (``service.scheduler``): concurrent questions
decode together in one batch, each row on its own pinned adapter version and its own memory
entries. ``prepare`` does the per-question work before the model (strategy, retrieval, the pinned
version, the prompt budget) in the caller's thread; ``submit`` queues it and ``events`` yields the
answer's events (``service.scheduler.AskJob``), tokens first, then the ``Answer``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.adapters import store
from service.adapters.live import LiveAdapters
from service.core.errors import BadRequest, ClientGone, TooLarge, Unavailable
from service.corpus_index import CorpusIndex
from service.scheduler import AskJob, Scheduler
from training.mac.runtime import MacRuntime
from training.pipeline import (PipelineConfig, PromptTooLong, fit_passages, parse_strategy, plain_prompt_ids,
                               prompt_budget, strategy_name)
from training.retrieval import Passage
from training.update_bank.runtime import UpdateBankRuntime

_POLL_SECONDS = 0.25  # how often a waiting request looks for its client and its deadline
_DEADLINE_GRACE_SECONDS = 1.0  # the scheduler answers a deadline itself; this is the backstop


@dataclass
class Answer:
    answer: str
    strategy: str
    passages: list[Passage]
    adapter_version: str | None
    memory_documents: list[str] = field(default_factory=list)
    memory_fallback: list[str] = field(default_factory=list)  # entries gone (evicted): answered from their text
    update_documents: list[str] = field(default_factory=list)  # update-bank entries applied
    timings: dict[str, float] = field(default_factory=dict)
    completion_tokens: int = 0


@dataclass
class Prepared:
    """A question ready for the model (``Answerer.prepare``)."""

    tenant: str
    question: str
    use: set[str]
    passages: list[Passage]
    texts: list[str] | None  # MAC: the passages' text as it goes in the prompt
    prompt_ids: torch.Tensor | None  # without MAC: the prompt's token ids (``plain_prompt_ids``)
    mac: MacRuntime | None
    version: str | None
    max_new_tokens: int
    retrieve_seconds: float
    bank: UpdateBankRuntime | None = None


@dataclass
class Submitted:
    prepared: Prepared
    job: AskJob
    queue: asyncio.Queue


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
        scheduler: Scheduler,
        mac_for: Callable[[str], MacRuntime | None] = lambda tenant: None,
        bank_for: Callable[[str], UpdateBankRuntime | None] = lambda tenant: None,
    ) -> None:
        self.model, self.tokenizer, self.sessions = model, tokenizer, sessions
        self.adapters, self.config, self.index, self.mac_for = adapters, config, index, mac_for
        self.bank_for, self.scheduler = bank_for, scheduler

    def question_tokens(self, question: str) -> int:
        return len(self.tokenizer(question, add_special_tokens=False)["input_ids"])

    def available(self, tenant: str) -> set[str]:
        out = {"rag"}
        if self.mac_for(tenant) is not None:
            out.add("mac")
        if self.bank_for(tenant) is not None:
            out.add("adapter")
            return out
        with self.sessions() as session:
            if store.active_version(session, tenant) is not None:
                out.add("adapter")
        return out

    def default_components(self, tenant: str) -> set[str]:
        """What ``auto`` uses: the configured default strategy, restricted to what is deployed."""
        return parse_strategy(self.config.strategy) & self.available(tenant)

    def prepare(self, tenant: str, question: str, strategy: str, top_k: int | None,
                max_new_tokens: int) -> Prepared:
        """Everything an answer needs before the model: the components, retrieved passages (cut to
        the prompt budget), the tenant's memory and the adapter version pinned for the request."""
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
        bank = self.bank_for(tenant) if "adapter" in use else None
        if bank is not None and mac is not None:
            if wanted is not None:
                raise BadRequest(f"strategy {strategy!r}: the update bank is not read together with MAC memory; "
                                 "ask for 'adapter' or 'mac' (each may add '+rag')")
            use.discard("adapter")  # auto: MAC, the better of the two on every benchmark
            bank = None
        if bank is not None and wanted is None and len(bank.bank) == 0:
            use.discard("adapter")
            bank = None
        if "adapter" not in use or bank is not None:
            version = None
        texts = [p.text for p in passages] if passages else None
        budget = prompt_budget(self.model, max_new_tokens, self.config.max_prompt_tokens, mac)
        prompt_ids = None
        try:  # here, not in the scheduler's thread: the model waits for nothing but the model
            if mac is None and bank is None:
                prompt_ids = plain_prompt_ids(self.tokenizer, question, texts, budget)
            else:
                texts = fit_passages(self.tokenizer, question, texts, budget)
        except PromptTooLong as exc:
            raise TooLarge(str(exc)) from None
        return Prepared(tenant, question, use, passages, texts, prompt_ids, mac, version, max_new_tokens,
                        time.perf_counter() - start, bank)

    def submit(self, prepared: Prepared, deadline: float) -> Submitted:
        """Queue the question for the model (``QueueFull``, a 503, if the queue is full)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = AskJob(prepared.tenant, prepared.question, prepared.texts, prepared.mac, prepared.version,
                     prepared.max_new_tokens, deadline, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                     prepared.prompt_ids, bank=prepared.bank)
        self.scheduler.submit(job)
        return Submitted(prepared, job, events)

    async def events(self, submitted: Submitted,
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple[str, Any]]:
        """The answer's events: ``("token", text)`` pieces as they decode, then ``("done", Answer)``;
        a failure raises its ``ServiceError``. Closing the iterator (a streaming client that left)
        or ``is_disconnected()`` turning true withdraws the question from the scheduler."""
        prepared, job, events, deadline = submitted.prepared, submitted.job, submitted.queue, submitted.job.deadline
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=_POLL_SECONDS)
                except TimeoutError:
                    if is_disconnected is not None and await is_disconnected():
                        self.scheduler.cancel(job)
                        raise ClientGone() from None
                    if time.monotonic() > deadline + _DEADLINE_GRACE_SECONDS and self.scheduler.abandon_if_waiting(job):
                        raise Unavailable("the model is busy with other questions and this one's deadline passed "
                                          "while it waited; retry later") from None
                    continue
                if kind == "token":
                    yield kind, value
                elif kind == "error":
                    raise value
                else:
                    text, memory_ids, fallback_ids = value
                    use = set(prepared.use)
                    if prepared.mac is not None and not memory_ids and not fallback_ids:
                        use.discard("mac")
                    if prepared.bank is not None and not job.update_ids:
                        use.discard("adapter")
                    timings = {"retrieve_seconds": prepared.retrieve_seconds, **job.timings(),
                               "batch_size": float(job.batch_size)}
                    yield "done", Answer(text, strategy_name(use), prepared.passages, prepared.version, memory_ids,
                                         fallback_ids, job.update_ids, timings, len(job.tokens))
                    return
        finally:
            if job._state != "done":
                self.scheduler.cancel(job)

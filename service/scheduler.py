"""The ask scheduler: a bounded queue of prepared questions and one thread that decodes them in
batches, so concurrent askers share the model's decoding steps instead of waiting for each other.

On a CPU one decoding step costs about as much for eight rows as for one (the weights are read
once per step either way), so eight questions answered together finish in little more than the
time of one. The loop takes the oldest waiting question and every other waiting question that can
decode with it (up to ``max_batch``), and runs them as one left-padded batch through
``training.pipeline.generate``, the function the harness measures:

* questions without MAC memory (retrieval, adapter, none, mixed) share a batch across tenants and
  adapter versions: each row names its own pinned version (PEFT ``adapter_names``, never a global
  ``set_adapter``, PEFT #804); a batch holds at most as many versions as stay loaded
  (``FRESHLM_ADAPTERS_LOADED``), so loading one never evicts another of the same batch;
* questions reading MAC memory batch with others of the same tenant and adapter version (each row
  reads its own memory entries, masked per row; the prompt head depends on the version).

Each row's prompt is prefilled alone, after the longest prefix of it that an earlier prompt of the
same tenant and adapter version left in the prefix cache (``training.prefix_cache``: the system
prompt, and the passages of questions about the same news), then the rows decode together.

Admission happens at batch boundaries ("dynamic batching"): a question that arrives while a batch
decodes waits for it (at most ``max_new_tokens`` steps). transformers' continuous-batching manager
(``generate_batch``) would admit it mid-decode, but it runs its own paged cache and cannot carry a
per-row adapter version or MAC's per-row memory prefix.

The queue is bounded (``max_waiting``): a question that finds it full is refused at once (503 with
``Retry-After``), never left waiting without bound. A question whose client went away leaves the
queue at once, or, while decoding, its row stops at the next step. A question's deadline ends its
row (504); one that waited for the model past its deadline is a 503. ``max_batch=1`` switches
batching off (one question at a time, as before), for A/B measurements.

The model lock (``LiveAdapters.lock``) is held while a batch decodes: adapters are loaded and
evicted, and the embedded worker writes MAC memory with the same model, only between batches.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.adapters.live import LiveAdapters
from service.core.errors import DeadlineExceeded, ServiceError, TooLarge, Unavailable, as_service_error
from training.mac.runtime import MacRuntime
from training.pipeline import PromptTooLong, generate
from training.prefix_cache import PrefixCache, PrefixCacheConfig
from training.precision import autocast



class SchedulerConfig(BaseModel):
    """How concurrent questions share the model."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(8, ge=1, description="questions decoded together (1: batching off)")
    max_waiting: int = Field(64, ge=1, description="questions waiting for the model before new ones get 503")
    batch_wait_seconds: float = Field(0.1, ge=0, description="how long a batch waits to gather as many questions "
                                                            "as the last batch answered plus those that waited for "
                                                            "it (a lone asker never waits)")
    retry_after_seconds: int = Field(2, ge=1, description="Retry-After of the 503 for a full queue")
    bf16: bool = Field(False, description="decode under bf16 autocast (CPUs with native bf16)")
    prefix_cache: PrefixCacheConfig = Field(default_factory=PrefixCacheConfig,
                                            description="prompt prefixes kept for reuse, per tenant and adapter version")


class QueueFull(Unavailable):
    """The wait queue is at ``max_waiting``: retry later."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


@dataclass
class AskJob:
    """One prepared question: what it decodes with, and where its events go.

    ``emit`` receives ``("token", text)`` for each decoded piece, then exactly one of ``("done",
    (answer, memory_ids, fallback_ids))`` or ``("error", ServiceError)``; it is called from the scheduler thread
    and must be thread-safe (the routes hand events to their event loop)."""

    tenant: str
    question: str
    passages: list[str] | None
    mac: MacRuntime | None
    version: str | None  # the adapter version pinned for the whole answer (None: the base model)
    max_new_tokens: int
    deadline: float  # time.monotonic()
    emit: Callable[[tuple[str, Any]], None]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    batch_size: int = 0
    tokens: list[int] = field(default_factory=list)
    waited_behind_work: bool = False
    _state: str = "queued"  # queued -> running -> done, or queued -> cancelled
    _cancel: threading.Event = field(default_factory=threading.Event)

    def key(self) -> tuple:
        """Questions with equal keys can decode in one batch."""
        if self.mac is None:
            return ("plain", self.max_new_tokens)
        return ("mac", self.tenant, self.version, self.max_new_tokens)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def timings(self) -> dict[str, float]:
        out = {}
        if self.started is not None:
            out["queue_seconds"] = self.started - self.enqueued
        first = self.first_token or self.finished  # an answer that ended at once has no first token
        if first is not None and self.started is not None:
            out["first_token_seconds"] = first - self.enqueued
        if self.finished is not None and self.started is not None:
            out["generate_seconds"] = self.finished - self.started
        return out


@dataclass
class SchedulerObserver:
    """Metrics hooks (``service.metrics``); each is optional."""

    queue_time: Callable[[float], None] = lambda seconds: None
    first_token: Callable[[float], None] = lambda seconds: None
    batch: Callable[[int, int, float], None] = lambda rows, tokens, seconds: None  # rows, tokens, decode seconds
    cancelled: Callable[[], None] = lambda: None


class Scheduler:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapters: LiveAdapters,
                 config: SchedulerConfig, max_prompt_tokens: int, observer: SchedulerObserver | None = None) -> None:
        self.model, self.tokenizer, self.adapters, self.config = model, tokenizer, adapters, config
        self.max_prompt_tokens = max_prompt_tokens
        self.prefix_cache = PrefixCache(config.prefix_cache)
        self.observer = observer or SchedulerObserver()
        self._waiting: deque[AskJob] = deque()
        self._cond = threading.Condition()
        self._running = 0
        self._expect = 1  # questions the next batch waits (briefly) to gather
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- the request side ---------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, job: AskJob) -> AskJob:
        """Queue ``job``; ``QueueFull`` (503 + Retry-After) when ``max_waiting`` questions wait."""
        with self._cond:
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFull(f"{len(self._waiting)} questions are waiting for the model (the limit, "
                                "FRESHLM_MAX_WAITING_ASKS); retry later", self.config.retry_after_seconds)
            job.waited_behind_work = self._running > 0 or bool(self._waiting)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: AskJob) -> None:
        """The client went away: a waiting job leaves the queue now (its place frees up), a decoding
        one stops at the next step."""
        with self._cond:
            job._cancel.set()
            if job._state == "queued":
                job._state = "cancelled"
                with contextlib.suppress(ValueError):
                    self._waiting.remove(job)
                self.observer.cancelled()

    def abandon_if_waiting(self, job: AskJob) -> bool:
        """True if ``job`` was still waiting and is now withdrawn (the route answers 503)."""
        with self._cond:
            if job._state != "queued":
                return False
            self.cancel(job)
            return True

    # --- the loop -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ask-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        for job in list(self._waiting):
            self._fail(job, Unavailable("the service is shutting down; retry"))

    def _take(self) -> list[AskJob]:
        """The oldest waiting job and up to ``max_batch - 1`` more with its key. Askers whose answers
        just came back usually ask again at once: waiting a moment (``batch_wait_seconds``) for as
        many questions as the last batch answered plus those that waited for it keeps the batches
        full, instead of splitting the askers into a small and a large batch that alternate."""
        with self._cond:
            while not self._waiting and not self._stop.is_set():
                self._cond.wait(timeout=0.5)
            if self._stop.is_set():
                return []
            target = min(self.config.max_batch, self._expect)
            if target > 1 and self.config.batch_wait_seconds > 0:
                until = time.monotonic() + self.config.batch_wait_seconds
                while len(self._waiting) < target and time.monotonic() < until:
                    self._cond.wait(timeout=max(until - time.monotonic(), 0))
                if not self._waiting:
                    return []
            key, batch, versions = self._waiting[0].key(), [], set()
            for job in self._waiting:  # at most as many adapter versions as stay loaded at once
                if len(batch) == self.config.max_batch:
                    break
                if job.key() != key or (job.version is not None and job.version not in versions
                                        and len(versions) >= self.adapters.capacity):
                    continue
                batch.append(job)
                if job.version is not None:
                    versions.add(job.version)
            for job in batch:
                self._waiting.remove(job)
                job._state = "running"
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as exc:  # one bad batch must not stop the loop
                # logs it once (a store that is down: its reason; anything else: the traceback)
                error = as_service_error(exc)  # a store that is down: 503; anything else: 500
                for job in batch:
                    self._fail(job, error)
            finally:
                with self._cond:
                    self._running = 0
                    # closed-loop clients ask again when answered: expect the batch back, plus those waiting
                    self._expect = len(batch) + len(self._waiting)

    def _fail(self, job: AskJob, error: Exception) -> None:
        if job._state != "done":
            job._state = "done"
            job.emit(("error", error))

    def _run(self, batch: list[AskJob]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if job.cancelled:
                continue
            if now >= job.deadline and job.waited_behind_work:
                self._fail(job, Unavailable("the model is busy with other questions and this one's deadline passed "
                                            "while it waited; retry later"))
                continue
            live.append(job)
        if not live:
            return
        timeout = max(min(j.deadline for j in live) - time.monotonic(), 0)
        if not self.adapters.lock.acquire(timeout=timeout):
            for job in live:
                self._fail(job, Unavailable("the model is busy with other questions and this one's deadline passed "
                                            "while it waited; retry later"))
            return
        try:
            self._decode(live)
        finally:
            self.adapters.lock.release()

    def _decode(self, batch: list[AskJob]) -> None:
        started = time.perf_counter()
        for job in batch:
            job.started, job.batch_size = started, len(batch)
            self.observer.queue_time(started - job.enqueued)
        names = [self.adapters.ensure(job.version) if job.version is not None else None for job in batch]
        mac = batch[0].mac  # a MAC batch shares tenant and version (``AskJob.key``)
        model, kwargs, hooks = self.model, {}, contextlib.nullcontext()
        if mac is None:  # a prompt's key/values depend on the tenant's adapter version
            kwargs = {"prefix_cache": self.prefix_cache, "cache_namespaces": [(j.tenant, j.version) for j in batch]}
        if self.adapters.peft is not None:
            model = self.adapters.peft
            kwargs["adapter_names"] = [name or "__base__" for name in names]
            if mac is not None:  # MAC calls the model directly: the pinned version via PEFT's forward hooks
                hooks = self.adapters.peft.base_model._enable_peft_forward_hooks(adapter_names=kwargs["adapter_names"])
                model, kwargs = self.adapters.base, {}
        timed_out: set[int] = set()
        pieces = [""] * len(batch)

        def on_step(tokens: dict[int, int | None]) -> set[int]:
            now, stop = time.perf_counter(), set()
            for i, token in tokens.items():
                job = batch[i]
                if token is None or i in timed_out:
                    continue
                if job.cancelled:
                    stop.add(i)
                    continue
                if time.monotonic() >= job.deadline:
                    timed_out.add(i)
                    stop.add(i)
                    continue
                if job.first_token is None:
                    job.first_token = now
                    self.observer.first_token(now - job.enqueued)
                job.tokens.append(token)
                text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
                if len(text) > len(pieces[i]) and not text.endswith("\ufffd"):  # whole characters only
                    job.emit(("token", text[len(pieces[i]):]))
                    pieces[i] = text
                if len(job.tokens) >= job.max_new_tokens:
                    stop.add(i)
            return stop

        try:
            with hooks, autocast(self.model.device, self.config.bf16):
                results = generate(model, self.tokenizer, [j.question for j in batch], [j.passages for j in batch],
                                   max(j.max_new_tokens for j in batch), mac=mac,
                                   adapter_active=names[0] is not None, max_prompt_tokens=self.max_prompt_tokens,
                                   on_step=on_step, prefill_each=len(batch) > 1, **kwargs)
        except PromptTooLong as exc:
            for job in batch:
                self._fail(job, TooLarge(str(exc)))
            return
        finished = time.perf_counter()
        self.observer.batch(len(batch), sum(len(j.tokens) for j in batch), finished - started)
        for i, (job, (text, memory_ids, fallback_ids)) in enumerate(zip(batch, results)):
            job.finished = finished
            if job.cancelled:
                job._state = "done"
                self.observer.cancelled()
            elif i in timed_out:
                self._fail(job, DeadlineExceeded(
                    "the answer did not finish within the request deadline (FRESHLM_ASK_DEADLINE_SECONDS); "
                    "ask for fewer max_new_tokens or retry"))
            else:
                job._state = "done"
                job.emit(("done", (text, memory_ids, fallback_ids)))

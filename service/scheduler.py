"""The ask scheduler: a bounded queue of prepared questions and one thread that decodes them
together, so concurrent askers share the model's decoding steps instead of waiting for each other.

On a CPU one decoding step reads all the weights whatever the batch (SmolLM2-135M: ~85 ms for one
row, ~2x that for eight), so rows decoded together share that cost. Questions without MAC memory
(retrieval, adapter, none, mixed; any tenant and adapter version) decode in one
``training.decode_batch.DecodeBatch``, the decoder the harness measures through
``training.pipeline.generate``, with continuous batching: between two decoding steps, waiting
questions join the running rows (up to ``max_batch``) after their prefill, and rows leave at their
stop token or token limit, so a question never waits for a whole batch to finish. Each row names its
own pinned adapter version (PEFT ``adapter_names``, never a global ``set_adapter``, PEFT #804); the
rows hold at most as many versions as stay loaded (``FRESHLM_ADAPTERS_LOADED``), so loading one never
evicts another in use. Each prefill starts after the longest prefix of the prompt that an earlier
prompt of the same tenant and version left in the prefix cache (``training.prefix_cache``: the
system prompt, the passages of questions about the same news); rows with short uncached tails
prefill in one forward pass.

Questions reading MAC memory batch with others of the same tenant and adapter version (each row
reads its own memory entries, masked per row; the prompt head depends on the version) and run one
batch at a time: when one is the oldest waiting question, no more plain rows join, and its batch
runs once they have drained. Questions applying the update bank (``FRESHLM_UPDATE_BANK``) do the
same with others of their tenant: ``UpdateBankRuntime.answer``, the harness's call, on the bank's
own model copy, each row with its entries in its own per-request adapter slot.

The queue is bounded (``max_waiting``): a question that finds it full is refused at once (503 with
``Retry-After``), never left waiting without bound. A question whose client went away leaves the
queue at once, or, while decoding, its row leaves at the next step. A question's deadline ends its
row (504); one that waited for the model past its deadline is a 503. ``max_batch=1`` switches
batching off (one question at a time), for A/B measurements.

The model lock (``LiveAdapters.lock``) is held for each admission and decoding step, not across
steps: adapters are loaded and evicted, and the embedded worker writes MAC memory with the same
model, between steps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.adapters.live import LiveAdapters
from service.core.errors import DeadlineExceeded, TooLarge, Unavailable, as_service_error
from training.decode_batch import DecodeBatch
from training.generation import pad_token_id, stop_token_ids
from training.mac.runtime import MacRuntime
from training.pipeline import PromptTooLong, generate
from training.precision import autocast
from training.prefix_cache import PrefixCache, PrefixCacheConfig
from training.prompts import extract_answer
from training.update_bank.runtime import UpdateBankRuntime



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
    passages: list[str] | None  # MAC rows: the passages, cut to the prompt budget
    mac: MacRuntime | None
    version: str | None  # the adapter version pinned for the whole answer (None: the base model)
    max_new_tokens: int
    deadline: float  # time.monotonic()
    emit: Callable[[tuple[str, Any]], None]
    prompt_ids: torch.Tensor | None = None  # plain rows: the prompt (``plain_prompt_ids``)
    bank: UpdateBankRuntime | None = None  # the tenant's update bank, applied per request (no ``version`` then)
    update_ids: list[str] = field(default_factory=list)  # the update-bank entries the answer applied
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    batch_size: int = 0
    tokens: list[int] = field(default_factory=list)
    waited_behind_work: bool = False
    _text: str = ""  # the decoded text streamed so far
    _timed_out: bool = False
    _state: str = "queued"  # queued -> running -> done, or queued -> cancelled
    _cancel: threading.Event = field(default_factory=threading.Event)

    def key(self) -> tuple:
        """Questions with equal keys can decode in one batch."""
        if self.bank is not None:
            return ("bank", self.tenant)
        if self.mac is None:
            return ("plain",)  # rows of any length limit, tenant and version decode together
        return ("mac", self.tenant, self.version, self.max_new_tokens)

    @property
    def alone(self) -> bool:
        """MAC and update-bank rows decode in batches of their own, one at a time."""
        return self.mac is not None or self.bank is not None

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
        self._expect = 1  # questions a fresh batch waits (briefly) to gather
        self._peak = 0  # the most rows decoding together since the decoder was last empty
        self._rows: dict[int, AskJob] = {}  # decoding now, by decoder key
        self._stop_ids, self._pad = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
        self._decoder = DecodeBatch(model, self._stop_ids, self._pad, self.prefix_cache)
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
        for job in list(self._waiting) + list(self._rows.values()):
            self._fail(job, Unavailable("the service is shutting down; retry"))

    def _take(self) -> list[AskJob]:
        """The questions to start now. While plain rows decode: every waiting plain question that
        fits beside them (up to ``max_batch`` rows, at most as many adapter versions as stay
        loaded), unless the oldest waiting question decodes alone (MAC memory, the update bank; then
        none: the rows drain and its batch runs next). With nothing decoding: the oldest question and
        up to ``max_batch - 1`` more that can decode with it. Askers whose answers just came back
        usually ask again at once: a fresh batch waits a moment (``batch_wait_seconds``) for as many
        questions as the last batch answered plus those that waited for it, instead of starting
        with one and taking the others in one prefill each as they arrive."""
        with self._cond:
            while not self._waiting and not self._rows and not self._stop.is_set():
                self._cond.wait(timeout=0.5)
            if self._stop.is_set() or not self._waiting:
                return []
            if self._rows:
                if self._waiting[0].alone:
                    return []
                return self._claim(self._waiting[0].key(), self.config.max_batch - len(self._rows),
                                   {job.version for job in self._rows.values() if job.version is not None})
            target = min(self.config.max_batch, self._expect)
            if target > 1 and self.config.batch_wait_seconds > 0:
                until = time.monotonic() + self.config.batch_wait_seconds
                while len(self._waiting) < target and time.monotonic() < until:
                    self._cond.wait(timeout=max(until - time.monotonic(), 0))
                if not self._waiting:
                    return []
            return self._claim(self._waiting[0].key(), self.config.max_batch, set())

    def _claim(self, key: tuple, room: int, versions: set[str]) -> list[AskJob]:
        """Up to ``room`` waiting questions with ``key``, oldest first, keeping the versions of the
        running rows and the claimed ones within what stays loaded (loading one never evicts
        another in use). Call with ``self._cond`` held."""
        batch = []
        for job in self._waiting:
            if len(batch) == room:
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
        self._running += len(batch)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            try:
                if batch and batch[0].alone:
                    self._run_alone(batch)
                elif batch or self._rows:
                    self._advance(batch)
            except Exception as exc:  # one bad batch must not stop the loop
                # logs it once (a store that is down: its reason; anything else: the traceback)
                error = as_service_error(exc)  # a store that is down: 503; anything else: 500
                for job in batch + list(self._rows.values()):
                    self._fail(job, error)
                self._rows.clear()
                self._decoder = DecodeBatch(self.model, self._stop_ids, self._pad, self.prefix_cache)
            finally:
                with self._cond:
                    self._running = len(self._rows)
                    self._peak = max(self._peak, len(batch), len(self._rows))
                    if not self._rows and self._peak:
                        # closed-loop clients ask again when answered: expect the rows back, plus those waiting
                        self._expect, self._peak = self._peak + len(self._waiting), 0

    def _fail(self, job: AskJob, error: Exception) -> None:
        if job._state != "done":
            job._state = "done"
            job.emit(("error", error))

    def _admissible(self, batch: list[AskJob]) -> list[AskJob]:
        """``batch`` less the questions whose clients left and those whose deadline passed while
        they waited behind other work (503: retry)."""
        now, live = time.monotonic(), []
        for job in batch:
            if job.cancelled:
                continue
            if now >= job.deadline and job.waited_behind_work:
                self._fail(job, Unavailable("the model is busy with other questions and this one's deadline passed "
                                            "while it waited; retry later"))
                continue
            live.append(job)
        return live

    def _acquire_model(self, jobs: list[AskJob], lock=None) -> bool:
        """The model lock (``lock``, default the adapters'), waiting at most until the earliest of
        ``jobs``' deadlines."""
        timeout = max(min(j.deadline for j in jobs) - time.monotonic(), 0) if jobs else None
        return (lock or self.adapters.lock).acquire(timeout=-1 if timeout is None else timeout)

    # --- plain rows: continuous batching --------------------------------------------------------

    def _advance(self, joining: list[AskJob]) -> None:
        """Admit ``joining`` into the running rows (prefilled after their cached prefixes), then
        decode one step for all rows; answer the rows that ended."""
        joining = self._admissible(joining)
        if not self._acquire_model(joining + list(self._rows.values())):
            for job in joining:
                self._fail(job, Unavailable("the model is busy with other questions and this one's deadline passed "
                                            "while it waited; retry later"))
            self._decoder.drop(self._handle({key: None for key, job in self._rows.items()
                                             if time.monotonic() >= job.deadline}))
            self._finish()
            return
        try:
            stop: set[int] = set()
            if joining:
                stop |= self._admit(joining)
            self._decoder.drop(stop)
            if len(self._decoder):
                started = time.perf_counter()
                rows = len(self._decoder)
                with autocast(self.model.device, self.config.bf16):
                    tokens = self._decoder.step()
                self.observer.batch(rows, sum(t is not None for t in tokens.values()), time.perf_counter() - started)
                for key in self._rows:
                    self._rows[key].batch_size = max(self._rows[key].batch_size, rows)
                self._decoder.drop(self._handle(tokens))
        finally:
            self.adapters.lock.release()
        self._finish()

    def _admit(self, joining: list[AskJob]) -> set[int]:
        """Prefill ``joining`` into the decoder; returns the rows to stop after their first token."""
        started = time.perf_counter()
        for job in joining:
            job.started = started
            self.observer.queue_time(started - job.enqueued)
            self._rows[id(job)] = job
        names = [self.adapters.ensure(job.version) if job.version is not None else None for job in joining]
        if self.adapters.peft is not None:
            names = [name or "__base__" for name in names]
        self._decoder.model = self.adapters.model
        stop: set[int] = set()
        with autocast(self.model.device, self.config.bf16):
            self._decoder.admit([job.prompt_ids for job in joining], [id(job) for job in joining],
                                [job.max_new_tokens for job in joining], names,
                                [(job.tenant, job.version) for job in joining],
                                on_first=lambda key, token: stop.update(self._handle({key: token})))
        for job in joining:
            job.batch_size = max(job.batch_size, len(self._decoder))
        return stop

    def _handle(self, tokens: dict[int, int | None]) -> set[int]:
        """Stream each row's new token; returns the rows to stop now (client gone, deadline passed)."""
        now, stop = time.perf_counter(), set()
        for key, token in tokens.items():
            job = self._rows[key]
            if job.cancelled:
                stop.add(key)
                continue
            if time.monotonic() >= job.deadline:
                job._timed_out = True
                stop.add(key)
                continue
            if token is None:
                continue
            if job.first_token is None:
                job.first_token = now
                self.observer.first_token(now - job.enqueued)
            job.tokens.append(token)
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
            if len(text) > len(job._text) and not text.endswith("\ufffd"):  # whole characters only
                job.emit(("token", text[len(job._text):]))
                job._text = text
        return stop

    def _finish(self) -> None:
        """Answer the rows that left the decoder."""
        finished = time.perf_counter()
        for key, tokens in list(self._decoder.finished.items()):
            del self._decoder.finished[key]
            answer = extract_answer(self.tokenizer.decode(tokens, skip_special_tokens=True))
            self._complete(self._rows.pop(key), finished, (answer, [], []))

    def _complete(self, job: AskJob, finished: float, result: tuple[str, list[str], list[str]]) -> None:
        """A row that left: its answer, or nothing (its client left), or a 504 (its deadline passed)."""
        job.finished = finished
        if job.cancelled:
            job._state = "done"
            self.observer.cancelled()
        elif job._timed_out:
            self._fail(job, DeadlineExceeded(
                "the answer did not finish within the request deadline (FRESHLM_ASK_DEADLINE_SECONDS); "
                "ask for fewer max_new_tokens or retry"))
        else:
            job._state = "done"
            job.emit(("done", result))

    # --- MAC and update-bank rows: one batch at a time -------------------------------------------

    def _run_alone(self, batch: list[AskJob]) -> None:
        live = self._admissible(batch)
        if not live:
            return
        lock = live[0].bank.model_lock if live[0].bank is not None else self.adapters.lock  # the bank's own model
        if not self._acquire_model(live, lock):
            for job in live:
                self._fail(job, Unavailable("the model is busy with other questions and this one's deadline passed "
                                            "while it waited; retry later"))
            return
        try:
            self._decode_alone(live)
        finally:
            lock.release()

    def _decode_alone(self, batch: list[AskJob]) -> None:
        started = time.perf_counter()
        for job in batch:
            job.started, job.batch_size = started, len(batch)
            self.observer.queue_time(started - job.enqueued)
        rows = {i: job for i, job in enumerate(batch)}
        self._rows.update(rows)
        try:
            def on_step(tokens: dict[int, int | None]) -> set[int]:
                return self._handle(tokens) | {i for i in tokens if len(rows[i].tokens) >= rows[i].max_new_tokens}

            generate_rows = self._generate_bank if batch[0].bank is not None else self._generate_mac
            results = generate_rows(batch, on_step)
        except PromptTooLong as exc:
            for job in batch:
                self._fail(job, TooLarge(str(exc)))
            return
        finally:
            for i in rows:
                self._rows.pop(i, None)
        finished = time.perf_counter()
        self.observer.batch(len(batch), sum(len(j.tokens) for j in batch), finished - started)
        for job, result in zip(batch, results):
            self._complete(job, finished, result)

    def _generate_mac(self, batch: list[AskJob], on_step) -> list[tuple[str, list[str], list[str]]]:
        names = [self.adapters.ensure(job.version) if job.version is not None else None for job in batch]
        mac = batch[0].mac  # a MAC batch shares tenant and version (``AskJob.key``)
        model, hooks = self.adapters.base, contextlib.nullcontext()
        if self.adapters.peft is not None:  # MAC calls the model directly: the pinned version via PEFT's forward hooks
            hooks = self.adapters.peft.base_model._enable_peft_forward_hooks(
                adapter_names=[name or "__base__" for name in names])
        with hooks, autocast(self.model.device, self.config.bf16):
            return generate(model, self.tokenizer, [j.question for j in batch], [j.passages for j in batch],
                            max(j.max_new_tokens for j in batch), mac=mac, adapter_active=names[0] is not None,
                            max_prompt_tokens=self.max_prompt_tokens, on_step=on_step)

    def _generate_bank(self, batch: list[AskJob], on_step) -> list[tuple[str, list[str], list[str]]]:
        bank = batch[0].bank  # a bank batch shares the tenant (``AskJob.key``)
        with autocast(bank.model.device, self.config.bf16):
            answers = bank.answer([j.question for j in batch], [j.passages for j in batch],
                                  max(j.max_new_tokens for j in batch), on_step=on_step)
        for job, (_, ids) in zip(batch, answers):
            job.update_ids = ids
        return [(text, [], []) for text, _ in answers]

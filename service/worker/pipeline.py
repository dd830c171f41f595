"""One document's way through the worker: claim -> memorize -> update -> finish.

For each claimed batch: MAC memory entries go to the Redis memory bank (one amortizer pass, each
entry written with replace semantics so a re-run after a crash never duplicates one), and, when
an updater is configured, each document is a guarded update of the live adapter that becomes a
new version (``service.adapters.publisher``). The document is marked ``ingested`` in the same SQL
transaction that records and activates its adapter version, so an update is applied exactly once
even across ``kill -9``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from service import documents
from service.adapters.publisher import AdapterPublisher, SwapConflict, build_publisher
from service.core.config import Settings
from service.db import REBUILD_ADAPTER_KEY, REBUILD_MEMORY_KEY, DocumentRecord, get_state, set_state
from service.runtime import Runtime
from service.worker.reconciler import memory_out_of_sync, reconcile_memory
from training.mac.runtime import MacRuntime

log = logging.getLogger("freshlm.worker")


class StaleClaim(Exception):
    """The document was deleted or taken over while this worker worked on it."""


@dataclass
class Worker:
    settings: Settings
    sessions: sessionmaker[Session]
    mac: MacRuntime | None = None
    publisher: AdapterPublisher | None = None
    on_ingested: Callable[[float], None] = lambda seconds: None
    on_swap: Callable[[], None] = lambda: None


def build_worker(rt: Runtime) -> Worker:
    """The worker of a runtime: its MAC runtime, and the configured updater on a private model copy."""
    settings = rt.settings
    worker = Worker(settings, rt.sessions, mac=rt.mac)
    if settings.updater_spec:
        worker.publisher = build_publisher(settings.updater_spec, rt.model, rt.tokenizer, settings.update_config(),
                                           rt.sessions, settings.adapters_dir, lr=settings.adapter_lr)
    return worker


def process_claim(worker: Worker, claim: documents.Claim) -> int:
    docs = claim.documents
    start = time.perf_counter()
    if worker.mac is not None:
        worker.mac.memorize([d.id for d in docs], [d.text for d in docs])
    shared = (time.perf_counter() - start) / max(len(docs), 1)
    publisher = worker.publisher
    done = 0
    for doc in docs:
        began = time.perf_counter()
        values: dict = {"memory_written": worker.mac is not None}
        snapshot = None
        try:
            if publisher is not None:
                publisher.sync()
            with worker.sessions.begin() as session:
                if publisher is not None:
                    snapshot = publisher.absorb(session, doc, values)
                seconds = shared + time.perf_counter() - began
                if not documents.finish(session, doc.id, claim.token, ingest_seconds=seconds, **values):
                    if snapshot is not None:
                        publisher.updater.restore(snapshot)
                    raise StaleClaim(doc.id)
            if values.get("adapter_version"):
                publisher.live_version = values["adapter_version"]
                worker.on_swap()
            worker.on_ingested(seconds)
            done += 1
        except StaleClaim:
            log.info("document %s was deleted or reclaimed while being ingested", doc.id)
            if worker.mac is not None:
                with worker.sessions() as session:
                    row = session.get(DocumentRecord, doc.id)
                    if row is None or row.status == "deleted":
                        worker.mac.delete(doc.id)
        except SwapConflict:
            log.info("active adapter changed during the update from %s; it goes back to the queue", doc.id)
            publisher.live_version = None
            documents.release_claim(worker.sessions, doc.id, claim.token)
        except Exception as exc:  # a bad document must not stop the worker
            log.exception("ingesting %s failed", doc.id)
            if publisher is not None:  # the transaction rolled back: reload the active version before the next update
                publisher.live_version = None
            documents.fail_attempt(worker.sessions, doc.id, claim.token, f"{exc.__class__.__name__}: {exc}",
                                   worker.settings.max_attempts)
    return done


def rebuild_adapter(worker: Worker) -> str | None:
    """Replay every live document into a new version from the initial one (takes deleted
    documents out of the adapter)."""
    if worker.publisher is None:
        return None
    with worker.sessions() as session:
        docs = documents.ingested(session)
    version = worker.publisher.rebuild(docs)
    if version is not None:
        worker.on_swap()
    return version


def run_once(worker: Worker) -> int:
    """One pass: requested rebuilds first, then one claimed batch. Returns the documents ingested."""
    if worker.mac is not None:
        with worker.sessions() as session:
            full = get_state(session, REBUILD_MEMORY_KEY)
        if full:
            reconcile_memory(worker.sessions, worker.mac, full=True)
            with worker.sessions.begin() as session:
                set_state(session, REBUILD_MEMORY_KEY, None)
        elif memory_out_of_sync(worker.sessions, worker.mac):
            reconcile_memory(worker.sessions, worker.mac)
    if worker.publisher is not None:
        with worker.sessions() as session:
            wanted = get_state(session, REBUILD_ADAPTER_KEY)
        if wanted:
            rebuild_adapter(worker)
        worker.publisher.sync()
    claim = documents.claim_batch(worker.sessions, worker.settings.worker_id, worker.settings.worker_batch,
                                  worker.settings.worker_lease_seconds)
    if not claim.documents:
        return 0
    done = process_claim(worker, claim)
    if worker.publisher is not None:
        pruned = worker.publisher.prune(worker.settings.adapter_keep_versions)
        if pruned:
            log.info("pruned the weights of %d old adapter versions", len(pruned))
    return done


def run_worker(worker: Worker, stop: threading.Event) -> None:
    released = documents.release_claims(worker.sessions, worker.settings.worker_id)
    if released:
        log.info("released %d documents this worker had claimed before it stopped", released)
    log.info("ingest worker %s started (mac: %s, updater: %s)", worker.settings.worker_id,
             worker.mac is not None, worker.settings.updater_spec or "none")
    while not stop.is_set():
        try:
            if run_once(worker) == 0:
                stop.wait(worker.settings.worker_poll_seconds)
        except Exception:  # database or Redis away: keep trying, the queue is durable
            log.exception("ingest worker pass failed; retrying")
            stop.wait(max(1.0, worker.settings.worker_poll_seconds))

"""The ingest worker: claims pending documents and makes them answerable.

For each claimed batch: MAC memory entries go to the Redis memory bank (one amortizer pass, each
entry written with replace semantics so a re-run after a crash never duplicates one), and, when
an updater is configured, each document is a guarded single-step update of the live adapter that
becomes a new version. The document is marked ``ingested`` in the same SQL transaction that records
and activates its adapter version, so an update is applied exactly once even across ``kill -9``.

Runs as a thread of the API process (``FRESHLM_EMBEDDED_WORKER``, the zero-config default) or as
its own process: ``freshlm-worker`` (``--rebuild-memory`` re-derives the whole bank from SQL).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service import adapter_store
from service.adapter_updater import AdapterUpdater, load_updater
from service.core.config import Settings
from service.db import DocumentRecord, get_state, make_engine, session_factory, set_state
from service.ingest_queue import Claim, claim_batch, fail_attempt, finish, release_claims
from service.mac_memory import MacRuntime, load_mac_runtime

log = logging.getLogger("freshlm.worker")
REBUILD_ADAPTER_KEY = "adapter_rebuild_requested"
REBUILD_MEMORY_KEY = "memory_rebuild_requested"


class StaleClaim(Exception):
    """The document was deleted or taken over while this worker worked on it."""


class SwapConflict(Exception):
    """The active adapter changed (a rollback) while this worker computed an update."""


@dataclass
class Worker:
    settings: Settings
    sessions: sessionmaker[Session]
    mac: MacRuntime | None = None
    updater: AdapterUpdater | None = None
    live_version: str | None = None
    on_ingested: Callable[[float], None] = lambda seconds: None
    on_swap: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)


def build_worker(
    settings: Settings,
    sessions: sessionmaker[Session],
    redis_client: redis.Redis | None,
    base: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    mac: MacRuntime | None = None,
) -> Worker:
    """Load what the configuration asks for (the MAC artifact, the updater and its own base model)."""
    if base is None and (settings.updater or settings.mac_artifact):
        from service.base_model import load_base_model

        base, tokenizer = load_base_model(settings)
    if mac is None and settings.mac_artifact is not None:
        mac = load_mac_runtime(settings.mac_artifact, base, tokenizer, redis_client, settings.model_settings(),
                               settings.mac_top_k, settings.mac_group_size, settings.mac_storage)
    worker = Worker(settings, sessions, mac=mac)
    if settings.updater:
        spec = load_updater(settings.updater, base, settings.adapter_rank, settings.adapter_lr)
        worker.info = spec.info
        worker.updater = AdapterUpdater(base, tokenizer, spec, settings.adapter_max_tokens, settings.adapter_max_drift)
    return worker


# --- adapter versions --------------------------------------------------------------------------


def sync_adapter(worker: Worker) -> None:
    """Make the worker's live adapter the active version (first run: publish the initial one)."""
    if worker.updater is None:
        return
    with worker.sessions() as session:
        active = adapter_store.active_version(session)
    if active is None:
        tensors = worker.updater.tensors()
        version = adapter_store.save_weights(worker.settings.adapters_dir, tensors, worker.updater.config)
        with worker.sessions.begin() as session:
            adapter_store.record_version(session, version, parent=None, kind="initial", documents=[],
                                         metrics={**worker.info})
            adapter_store.activate(session, version, expected=None)
        with worker.sessions() as session:
            active = adapter_store.active_version(session)
    if active != worker.live_version:
        tensors, _config = adapter_store.load_weights(worker.settings.adapters_dir, active)
        worker.updater.load(tensors)
        worker.live_version = active
        log.info("worker adapter is now version %s", active)


def _absorb(worker: Worker, session: Session, doc: DocumentRecord, token: str, values: dict) -> None:
    """Single-step update from ``doc``; records + activates the new version in ``session``."""
    snapshot = worker.updater.snapshot()
    result = worker.updater.step(doc.text)
    if result.tensors is None:
        values["adapter_note"] = f"update rejected: {result.rejected}"
        return
    version = adapter_store.save_weights(worker.settings.adapters_dir, result.tensors, worker.updater.config)
    adapter_store.record_version(session, version, parent=worker.live_version, kind="update",
                                 documents=[doc.id], metrics=result.metrics)
    if not adapter_store.activate(session, version, expected=worker.live_version):
        worker.updater.restore(snapshot)
        raise SwapConflict(doc.id)
    values["adapter_version"] = version
    values["_snapshot"] = snapshot


# --- documents ---------------------------------------------------------------------------------


def process_claim(worker: Worker, claim: Claim) -> int:
    docs = claim.documents
    start = time.perf_counter()
    if worker.mac is not None:
        worker.mac.memorize([d.id for d in docs], [d.text for d in docs])
    shared = (time.perf_counter() - start) / max(len(docs), 1)
    done = 0
    for doc in docs:
        began = time.perf_counter()
        values: dict = {"memory_written": worker.mac is not None}
        try:
            if worker.updater is not None:
                sync_adapter(worker)
            with worker.sessions.begin() as session:
                if worker.updater is not None:
                    _absorb(worker, session, doc, claim.token, values)
                snapshot = values.pop("_snapshot", None)
                seconds = shared + time.perf_counter() - began
                if not finish(session, doc.id, claim.token, ingest_seconds=seconds, **values):
                    if snapshot is not None:
                        worker.updater.restore(snapshot)
                    raise StaleClaim(doc.id)
            if values.get("adapter_version"):
                worker.live_version = values["adapter_version"]
                worker.on_swap()
            worker.on_ingested(seconds)
            done += 1
        except StaleClaim:
            log.info("document %s was deleted or reclaimed while being ingested", doc.id)
            if worker.mac is not None:
                with worker.sessions() as session:
                    row = session.get(DocumentRecord, doc.id)
                    if row is None or row.status == "deleted":
                        worker.mac.bank.delete(doc.id)
        except SwapConflict:
            log.info("active adapter changed during the update from %s; it goes back to the queue", doc.id)
            worker.live_version = None
            _release(worker, doc.id, claim.token)
        except Exception as exc:  # a bad document must not stop the worker
            log.exception("ingesting %s failed", doc.id)
            fail_attempt(worker.sessions, doc.id, claim.token, f"{exc.__class__.__name__}: {exc}",
                         worker.settings.max_attempts)
    return done


def _release(worker: Worker, doc_id: str, token: str) -> None:
    with worker.sessions.begin() as session:
        session.execute(update(DocumentRecord).where(DocumentRecord.id == doc_id, DocumentRecord.claim_token == token)
                        .values(claimed_by=None, claim_token=None, lease_until=None,
                                attempts=DocumentRecord.attempts - 1))


# --- memory bank rebuild -----------------------------------------------------------------------


def _memory_ids(session: Session) -> set[str]:
    return set(session.scalars(select(DocumentRecord.id).where(
        DocumentRecord.status == "ingested", DocumentRecord.memory_written.is_(True))))


def reconcile_memory(worker: Worker, full: bool = False, chunk: int = 16) -> dict[str, int]:
    """Make the bank match SQL: re-memorize missing entries (all of them with ``full``), drop
    entries of deleted documents. Used after Redis comes back empty and by ``--rebuild-memory``."""
    if worker.mac is None:
        return {"written": 0, "removed": 0}
    bank = worker.mac.bank
    with worker.sessions() as session:
        wanted = _memory_ids(session)
        if full:
            wanted |= set(session.scalars(select(DocumentRecord.id).where(DocumentRecord.status == "ingested")))
    present = set(bank.ids())
    missing = sorted(wanted if full else wanted - present)
    for start in range(0, len(missing), chunk):
        ids = missing[start : start + chunk]
        with worker.sessions() as session:
            rows = {r.id: r for r in session.scalars(select(DocumentRecord).where(DocumentRecord.id.in_(ids)))}
        live = [i for i in ids if i in rows and rows[i].status == "ingested"]
        worker.mac.memorize(live, [rows[i].text for i in live])
        with worker.sessions.begin() as session:
            session.execute(update(DocumentRecord).where(DocumentRecord.id.in_(live))
                            .values(memory_written=True).execution_options(synchronize_session=False))
    removed = 0
    extra = present - wanted
    if extra:
        with worker.sessions() as session:
            alive = set(session.scalars(select(DocumentRecord.id).where(
                DocumentRecord.id.in_(sorted(extra)), DocumentRecord.status != "deleted")))
        for doc_id in sorted(extra - alive):
            removed += bank.delete(doc_id)
    if missing or removed:
        log.info("memory bank reconciled: %d entries written, %d removed", len(missing), removed)
    return {"written": len(missing), "removed": removed}


def memory_out_of_sync(worker: Worker) -> bool:
    """Cheap check run every loop: fewer entries in Redis than SQL says were written."""
    if worker.mac is None:
        return False
    with worker.sessions() as session:
        expected = session.scalar(select(func.count()).select_from(DocumentRecord).where(
            DocumentRecord.status == "ingested", DocumentRecord.memory_written.is_(True)))
    return len(worker.mac.bank) < int(expected)


def rebuild_adapter(worker: Worker) -> str | None:
    """Replay the updates of every live document (in ingest order) from the initial version: the
    way to take a deleted document out of the adapter. Activates the result."""
    if worker.updater is None:
        return None
    with worker.sessions() as session:
        initial = [v for v in adapter_store.list_versions(session) if v.kind == "initial"]
        docs = list(session.scalars(select(DocumentRecord).where(DocumentRecord.status == "ingested")
                                    .order_by(DocumentRecord.ingested_at, DocumentRecord.id)))
    if not initial:
        return None
    tensors, _ = adapter_store.load_weights(worker.settings.adapters_dir, initial[0].version)
    worker.updater.load(tensors)
    absorbed, metrics = [], {"rejected": 0}
    for doc in docs:
        result = worker.updater.step(doc.text)
        if result.tensors is None:
            metrics["rejected"] += 1
        else:
            absorbed.append(doc.id)
    version = adapter_store.save_weights(worker.settings.adapters_dir, worker.updater.tensors(), worker.updater.config)
    with worker.sessions.begin() as session:
        adapter_store.record_version(session, version, parent=None, kind="rebuild", documents=absorbed, metrics=metrics)
        adapter_store.activate(session, version)
        set_state(session, REBUILD_ADAPTER_KEY, None)
    worker.live_version = version
    worker.on_swap()
    log.info("adapter rebuilt from %d documents: version %s", len(absorbed), version)
    return version


# --- loop --------------------------------------------------------------------------------------


def run_once(worker: Worker) -> int:
    """One pass: rebuilds first, then one claimed batch. Returns the documents ingested."""
    if worker.mac is not None:
        with worker.sessions() as session:
            full = get_state(session, REBUILD_MEMORY_KEY)
        if full:
            reconcile_memory(worker, full=True)
            with worker.sessions.begin() as session:
                set_state(session, REBUILD_MEMORY_KEY, None)
        elif memory_out_of_sync(worker):
            reconcile_memory(worker)
    if worker.updater is not None:
        with worker.sessions() as session:
            wanted = get_state(session, REBUILD_ADAPTER_KEY)
        if wanted:
            rebuild_adapter(worker)
        sync_adapter(worker)
    claim = claim_batch(worker.sessions, worker.settings.worker_id, worker.settings.worker_batch,
                        worker.settings.worker_lease_seconds)
    if not claim.documents:
        return 0
    done = process_claim(worker, claim)
    if worker.updater is not None:
        with worker.sessions() as session:
            pruned = adapter_store.prune(session, worker.settings.adapters_dir, worker.settings.adapter_keep_versions)
        if pruned:
            log.info("pruned the weights of %d old adapter versions", len(pruned))
    return done


def run_worker(worker: Worker, stop: threading.Event) -> None:
    released = release_claims(worker.sessions, worker.settings.worker_id)
    if released:
        log.info("released %d documents this worker had claimed before it stopped", released)
    log.info("ingest worker %s started (mac: %s, updater: %s)", worker.settings.worker_id,
             worker.mac is not None, worker.settings.updater or "none")
    while not stop.is_set():
        try:
            if run_once(worker) == 0:
                stop.wait(worker.settings.worker_poll_seconds)
        except Exception:  # database or Redis away: keep trying, the queue is durable
            log.exception("ingest worker pass failed; retrying")
            stop.wait(max(1.0, worker.settings.worker_poll_seconds))


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``freshlm-worker``."""
    from service.core.logging import configure_logging
    from service.main import open_redis
    from service.migrate import upgrade_database

    parser = argparse.ArgumentParser(description="FreshLM ingest worker (settings: FRESHLM_* variables)")
    parser.add_argument("--rebuild-memory", action="store_true", help="re-derive the whole memory bank from SQL and exit")
    parser.add_argument("--rebuild-adapter", action="store_true", help="replay all live documents into a new adapter version and exit")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve this worker's Prometheus metrics")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_json)
    engine = make_engine(settings.sqlalchemy_url)
    if settings.auto_migrate:
        upgrade_database(engine)
    redis_client, embedded = open_redis(settings)
    worker = build_worker(settings, session_factory(engine), redis_client)
    try:
        if args.rebuild_memory:
            print(json.dumps(reconcile_memory(worker, full=True)))
            return
        if args.rebuild_adapter:
            print(json.dumps({"version": rebuild_adapter(worker)}))
            return
        if args.metrics_port is not None:
            from prometheus_client import start_http_server

            from service.metrics import Metrics

            metrics = Metrics()
            worker.on_ingested = metrics.ingest_seconds.observe
            start_http_server(args.metrics_port, registry=metrics.registry)
        stop = threading.Event()
        import signal

        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            run_worker(worker, stop)
        except KeyboardInterrupt:
            pass
    finally:
        redis_client.close()
        engine.dispose()
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    main()

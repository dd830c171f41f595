"""One document's way through the worker: claim -> memorize -> update -> finish.

A claimed batch may hold several tenants' documents; each goes to its own tenant's places. MAC
memory entries go to the tenant's Redis memory bank (one amortizer pass per tenant, each entry
written with replace semantics so a re-run after a crash never duplicates one), and, when an
updater is configured, each document is a guarded update of its tenant's live adapter that
becomes a new version (``service.adapters.publisher``). The document is marked ``ingested`` in the
same SQL transaction that records and activates its adapter version, so an update is applied
exactly once even across ``kill -9``; the embedded worker also puts it in the retrieval index
as that transaction commits (``service.corpus_index``). With the update bank
(``FRESHLM_UPDATE_BANK``) the updater's step on each document is kept as the document's entry in
the tenant's bank instead (written before the document is marked ingested, replacing any earlier
entry: a re-run after a crash writes it again, never twice), and no adapter version is made.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from service import documents
from service.adapters.publisher import AdapterPublisher, SwapConflict, build_publisher
from service.artifacts import BankSwitch
from service.core.config import Settings
from service.corpus_index import CorpusIndex
from service.db import (
    DEFAULT_TENANT, REBUILD_ADAPTER_KEY, REBUILD_MEMORY_KEY, Database, DocumentRecord, set_state, tenants_with_state,
)
from service.runtime import Runtime
from service.worker.reconciler import reconcile_memory, reconcile_update_bank, tenants_out_of_sync
from training.mac.runtime import MacRuntime
from training.update_bank.runtime import UpdateBankRuntime

log = logging.getLogger("freshlm.worker")


class StaleClaim(Exception):
    """The document was deleted or taken over while this worker worked on it."""


@dataclass
class Worker:
    settings: Settings
    db: Database
    mac_for: Callable[[str], MacRuntime | None] = lambda tenant: None
    publisher: AdapterPublisher | None = None
    index: CorpusIndex | None = None  # the API process's retrieval index (embedded worker only)
    on_ingested: Callable[[float], None] = lambda seconds: None
    on_swap: Callable[[], None] = lambda: None
    switch: BankSwitch | None = None  # moves the memory to a newly activated MAC artifact
    bank_for: Callable[[str], UpdateBankRuntime | None] = lambda tenant: None
    bank_checked: dict[str, tuple[int, int]] = field(default_factory=dict)  # tenant -> (entries, documents) reconciled

    @property
    def has_mac(self) -> bool:
        return self.mac_for(DEFAULT_TENANT) is not None

    @property
    def has_bank(self) -> bool:
        return self.bank_for(DEFAULT_TENANT) is not None

    def commit(self, session: Session, doc: DocumentRecord) -> None:
        if self.index is not None:
            self.index.commit_ingested(session, doc)
        else:
            session.commit()


def build_worker(rt: Runtime) -> Worker:
    """The worker of a runtime: its MAC runtime, and the configured updater on a private model copy
    (the update bank's, or a versioned live adapter's)."""
    settings = rt.settings
    worker = Worker(settings, rt.db, mac_for=rt.mac_for, switch=BankSwitch(rt, chunk=2 * settings.worker_batch))
    if settings.update_bank:
        if rt.update_bank is None:
            raise RuntimeError(f"the update bank is not loaded: {rt.errors.get('update_bank')}")
        worker.bank_for = rt.bank_for
    elif settings.updater_spec:
        worker.publisher = build_publisher(settings.updater_spec, rt.model, rt.tokenizer, settings.update_config(),
                                           rt.db, settings.adapters_dir, lr=settings.adapter_lr)
    return worker


def process_claim(worker: Worker, claim: documents.Claim) -> int:
    docs = sorted(claim.documents, key=lambda d: d.tenant_id)  # stable: each tenant's order is kept
    start = time.perf_counter()
    for tenant, group in itertools.groupby(docs, key=lambda d: d.tenant_id):
        group = list(group)
        for runtime in (worker.mac_for(tenant), worker.bank_for(tenant)):
            if runtime is not None:
                runtime.memorize([d.id for d in group], [d.text for d in group])
    shared = (time.perf_counter() - start) / max(len(docs), 1)
    publisher = worker.publisher
    done = 0
    for doc in docs:
        began = time.perf_counter()
        values: dict = {"memory_written": worker.mac_for(doc.tenant_id) is not None}
        snapshot = None
        try:
            if publisher is not None:
                publisher.sync(doc.tenant_id)
            with worker.db.write() as session:
                if publisher is not None:
                    snapshot = publisher.absorb(session, doc, values)
                seconds = shared + time.perf_counter() - began
                if not documents.finish(session, doc, claim.token, ingest_seconds=seconds, **values):
                    if snapshot is not None:
                        publisher.updater.restore(snapshot)
                    raise StaleClaim(doc.id)
                worker.commit(session, doc)
            if values.get("adapter_version"):
                publisher.live = (doc.tenant_id, values["adapter_version"])
                worker.on_swap()
            worker.on_ingested(seconds)
            done += 1
        except StaleClaim:
            log.info("document %s of tenant %s was deleted or reclaimed while being ingested", doc.id, doc.tenant_id)
            runtimes = [r for r in (worker.mac_for(doc.tenant_id), worker.bank_for(doc.tenant_id)) if r is not None]
            if runtimes:
                with worker.db.read() as session:
                    row = documents.get(session, doc.tenant_id, doc.id)
                    if row is None or row.status == "deleted":
                        for runtime in runtimes:
                            runtime.delete(doc.id)
        except SwapConflict:
            log.info("active adapter changed during the update from %s; it goes back to the queue", doc.id)
            publisher.live = None
            documents.release_claim(worker.db.write, doc, claim.token)
        except Exception as exc:  # a bad document must not stop the worker
            log.exception("ingesting %s failed", doc.id)
            if publisher is not None:  # the transaction rolled back: reload the active version before the next update
                publisher.live = None
            documents.fail_attempt(worker.db.write, doc, claim.token, f"{exc.__class__.__name__}: {exc}",
                                   worker.settings.max_attempts)
    return done


def rebuild_adapter(worker: Worker, tenant: str) -> str | None:
    """Replay every live document of ``tenant`` into a new version from its initial one (takes
    deleted documents out of the adapter)."""
    if worker.publisher is None:
        return None
    with worker.db.read() as session:
        docs = documents.ingested(session, tenant)
    version = worker.publisher.rebuild(tenant, docs)
    if version is not None:
        worker.on_swap()
    return version


def _bank_size(worker: Worker) -> Callable[[str], int]:
    return lambda tenant: len(worker.mac_for(tenant).bank)


def _bank_missing(worker: Worker) -> Callable[[str], int]:
    def count(tenant: str) -> int:
        bank = worker.mac_for(tenant).bank
        return len(bank.missing()) if hasattr(bank, "missing") else 0
    return count


def reconcile_update_banks(worker: Worker, full: set[str]) -> None:
    """Rebuild the update banks of ``full``; fill any tenant's bank that holds fewer entries than it
    has ingested documents (Redis restarted empty), once per (entries, documents): a document
    whose step the guard rejects has no entry, and is not stepped again at every pass."""
    with worker.db.read() as session:
        counts = documents.count_ingested(session)
    for tenant in sorted(full | set(counts)):
        bank = worker.bank_for(tenant)
        state = (len(bank.bank), counts.get(tenant, 0))
        if tenant in full or (state[0] < state[1] and worker.bank_checked.get(tenant) != state):
            reconcile_update_bank(worker.db, bank, tenant, full=tenant in full)
            worker.bank_checked[tenant] = (len(bank.bank), counts.get(tenant, 0))


def run_once(worker: Worker) -> int:
    """One pass: a step of a MAC artifact switch, requested rebuilds, then one claimed batch.
    Returns the documents ingested."""
    if worker.switch is not None:
        try:
            worker.switch.step()
        except Exception:  # a switch that cannot proceed must not stop ingestion
            log.exception("MAC artifact switch step failed; retrying next pass")
    if worker.has_mac or worker.has_bank:
        with worker.db.read() as session:
            full = set(tenants_with_state(session, REBUILD_MEMORY_KEY))
        if worker.has_bank:
            reconcile_update_banks(worker, full)
        out_of_sync = tenants_out_of_sync(worker.db, _bank_size(worker), _bank_missing(worker)) if worker.has_mac else []
        for tenant in sorted(full | set(out_of_sync)):
            if worker.has_mac:
                reconcile_memory(worker.db, worker.mac_for(tenant), tenant, full=tenant in full)
            if tenant in full:
                with worker.db.write.begin() as session:
                    set_state(session, tenant, REBUILD_MEMORY_KEY, None)
    if worker.publisher is not None:
        with worker.db.read() as session:
            wanted = tenants_with_state(session, REBUILD_ADAPTER_KEY)
        for tenant in wanted:
            rebuild_adapter(worker, tenant)
    claim = documents.claim_batch(worker.db.write, worker.settings.worker_id, worker.settings.worker_batch,
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
    released = documents.release_claims(worker.db.write, worker.settings.worker_id)
    if released:
        log.info("released %d documents this worker had claimed before it stopped", released)
    log.info("ingest worker %s started (mac: %s, updater: %s%s)", worker.settings.worker_id,
             worker.has_mac, worker.settings.updater_spec or "none", ", into the update bank" if worker.has_bank else "")
    while not stop.is_set():
        try:
            if run_once(worker) == 0:
                stop.wait(worker.settings.worker_poll_seconds)
        except Exception:  # database or Redis away: keep trying, the queue is durable
            log.exception("ingest worker pass failed; retrying")
            stop.wait(max(1.0, worker.settings.worker_poll_seconds))

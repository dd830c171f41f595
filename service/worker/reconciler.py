"""The memory bank against SQL: SQL says which documents have an entry; Redis may have lost some
(restarted empty, evicted) or still hold a deleted document's. Reconciling re-memorizes what is
missing and drops what should be gone; ``full`` re-derives every entry (``POST /memory/rebuild``)."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from service import documents
from training.mac.runtime import MacRuntime

log = logging.getLogger("freshlm.worker")


def reconcile_memory(sessions: sessionmaker[Session], mac: MacRuntime, full: bool = False,
                     chunk: int = 16) -> dict[str, int]:
    bank = mac.bank
    with sessions() as session:
        wanted = documents.ids_with_memory(session)
        if full:
            wanted |= {d.id for d in documents.ingested(session)}
    present = set(bank.ids())
    missing = sorted(wanted if full else wanted - present)
    for start in range(0, len(missing), chunk):
        ids = missing[start : start + chunk]
        with sessions() as session:
            rows = documents.ingested(session, ids)
        mac.memorize([r.id for r in rows], [r.text for r in rows])
        with sessions.begin() as session:
            documents.mark_memory_written(session, [r.id for r in rows])
    removed = 0
    extra = present - wanted
    if extra:
        with sessions() as session:
            alive = documents.not_deleted(session, sorted(extra))
        for doc_id in sorted(extra - alive):
            removed += mac.delete(doc_id)
    if missing or removed:
        log.info("memory bank reconciled: %d entries written, %d removed", len(missing), removed)
    return {"written": len(missing), "removed": removed}


def memory_out_of_sync(sessions: sessionmaker[Session], mac: MacRuntime) -> bool:
    """Cheap check run every loop: fewer entries in Redis than SQL says were written."""
    with sessions() as session:
        expected = documents.count_with_memory(session)
    return len(mac.bank) < expected

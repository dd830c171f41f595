"""A tenant's memory bank against SQL: SQL says which documents have an entry; Redis may have lost
some (restarted empty, evicted: a question that chose a gone entry lists it in the bank's
``missing`` set) or still hold a deleted document's. Reconciling re-memorizes what
is missing and drops what should be gone; ``full`` re-derives every entry (``POST /memory/rebuild``).
The update bank (``reconcile_update_bank``) is held to every ingested document the same way."""

from __future__ import annotations

import logging

from service import documents
from service.db import Database
from training.mac.runtime import MacRuntime
from training.update_bank.runtime import UpdateBankRuntime

log = logging.getLogger("freshlm.worker")


def reconcile_memory(db: Database, mac: MacRuntime, tenant: str, full: bool = False,
                     chunk: int = 16, limit: int | None = None) -> dict[str, int]:
    """``mac`` is the tenant's runtime (its bank). ``limit``: write at most that many entries now
    (a background bank switch works in bounded steps); ``remaining`` says how many are left."""
    bank = mac.bank
    with db.read() as session:
        wanted = documents.ids_with_memory(session, tenant)
        if full:
            wanted |= {d.id for d in documents.ingested(session, tenant)}
    present = set(bank.ids())
    gone = set(bank.missing()) if hasattr(bank, "missing") else set()  # evicted entries questions chose
    missing = sorted(wanted if full else (wanted - present) | (gone & wanted))
    remaining = missing[limit:] if limit is not None else []
    missing = missing[:limit] if limit is not None else missing
    for start in range(0, len(missing), chunk):
        ids = missing[start : start + chunk]
        with db.read() as session:
            rows = documents.ingested(session, tenant, ids)
        mac.memorize([r.id for r in rows], [r.text for r in rows])
        with db.write.begin() as session:
            documents.mark_memory_written(session, tenant, [r.id for r in rows])
    removed = remove_deleted(db, tenant, present - wanted, mac.delete)
    for doc_id in sorted(gone - wanted):  # chosen, then deleted: nothing to rebuild
        mac.delete(doc_id)
    if missing or removed:
        log.info("memory bank of tenant %s reconciled: %d entries written, %d removed", tenant, len(missing), removed)
    return {"written": len(missing), "removed": removed, "wanted": len(wanted), "remaining": len(remaining)}


def remove_deleted(db: Database, tenant: str, extra: set[str], delete) -> int:
    """Delete (``delete(doc_id) -> bool``) the entries among ``extra`` (in a bank, not wanted) whose
    document was deleted, not those still being ingested; returns how many were removed."""
    if not extra:
        return 0
    with db.read() as session:
        alive = documents.not_deleted(session, tenant, sorted(extra))
    return sum(delete(doc_id) for doc_id in sorted(extra - alive))


def reconcile_update_bank(db: Database, bank: UpdateBankRuntime, tenant: str, full: bool = False,
                          chunk: int = 16) -> dict[str, int]:
    """``bank`` is the tenant's update bank: one step per ingested document without an entry (every
    one with ``full``), and the entries of deleted documents dropped. A step the guard rejected
    stores nothing, so such a document is stepped again at the next reconciliation."""
    with db.read() as session:
        wanted = {d.id for d in documents.ingested(session, tenant)}
    present = set(bank.bank.ids())
    missing = sorted(wanted if full else wanted - present)
    written = 0
    for start in range(0, len(missing), chunk):
        with db.read() as session:
            rows = documents.ingested(session, tenant, missing[start : start + chunk])
        written += bank.memorize([r.id for r in rows], [r.text for r in rows])
    removed = remove_deleted(db, tenant, present - wanted, bank.delete)
    if missing or removed:
        log.info("update bank of tenant %s reconciled: %d of %d entries written, %d removed", tenant, written,
                 len(missing), removed)
    return {"written": written, "removed": removed, "wanted": len(wanted)}


def tenants_out_of_sync(db: Database, bank_size, bank_missing=lambda tenant: 0) -> list[str]:
    """Cheap check run every loop: tenants whose bank holds fewer entries than SQL says were
    written (``bank_size(tenant)`` reads the size of a tenant's bank), or lists entries found gone
    (``bank_missing(tenant)``: how many)."""
    with db.read() as session:
        expected = documents.count_with_memory(session)
    return [tenant for tenant, n in sorted(expected.items()) if bank_size(tenant) < n or bank_missing(tenant)]

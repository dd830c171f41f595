"""Every change of a document's state, in one place: stored by the API (pending), claimed and
finished by the worker (ingested / failed), deleted by an admin. A document is addressed by its
tenant and its id; every read here is scoped to one tenant except the worker's queue.

The ingest queue is the ``documents`` table (all tenants, oldest first): claim pending rows with a
lease, finish them. A row stays ``pending`` until the work on it is committed, so a worker killed
mid-document leaves it claimable again: its own claims are released when it restarts (same
``worker_id``), anyone else's once the lease runs out. Finishing is conditional on the claim
token, so a row deleted or taken over meanwhile is never marked by a stale worker.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import DocumentRecord, content_hash, utcnow


class ConflictingDocuments(Exception):
    """Ids that already exist (or repeat in the batch) with other content."""


@dataclass(frozen=True)
class Stored:
    id: str
    status: str
    created: bool  # False: the same document was already stored (a no-op)


def get(session: Session, tenant: str, doc_id: str) -> DocumentRecord | None:
    return session.get(DocumentRecord, (tenant, doc_id))


def store_batch(session: Session, tenant: str, docs) -> list[Stored]:
    """Queue a batch of documents (objects with id, text, title, source, published_at) of ``tenant``
    in the caller's (write) transaction: new ids and re-posted deleted ids become ``pending``; the
    same id with the same content is a no-op; the same id with other content raises
    ``ConflictingDocuments``."""
    hashes: dict[str, str] = {}
    for d in docs:
        h = content_hash(d.text, d.title, d.source, d.published_at)
        if hashes.setdefault(d.id, h) != h:
            raise ConflictingDocuments(f"document {d.id!r} appears twice in the batch with different content")
    existing = {r.id: r for r in session.scalars(select(DocumentRecord).where(
        DocumentRecord.tenant_id == tenant, DocumentRecord.id.in_(list(hashes))))}
    conflicts = sorted(i for i, r in existing.items() if r.status != "deleted" and r.content_hash != hashes[i])
    if conflicts:
        raise ConflictingDocuments(f"documents {conflicts} already exist with different content; "
                                   "use new ids or delete them first")
    stored, seen, now = [], set(), utcnow()
    for d in docs:
        if d.id in seen:
            continue
        seen.add(d.id)
        record = existing.get(d.id)
        is_new = record is None or record.status == "deleted"
        if record is None:
            record = DocumentRecord(tenant_id=tenant, id=d.id, created_at=now)
            session.add(record)
        if is_new:  # new, or a deleted id posted again: back into the queue
            record.text, record.title, record.source, record.published_at = d.text, d.title, d.source, d.published_at
            record.content_hash, record.status, record.attempts = hashes[d.id], "pending", 0
            record.failure_reason = record.adapter_version = record.adapter_note = record.deleted_at = None
            record.memory_written, record.ingested_at, record.created_at = False, None, now
            record.claimed_by = record.claim_token = record.lease_until = None
        stored.append(Stored(d.id, record.status, is_new))
    return stored


def mark_deleted(session: Session, record: DocumentRecord) -> None:
    """Erase a document's text (in the caller's transaction); its memory entry is the caller's to drop."""
    record.status, record.deleted_at = "deleted", utcnow()
    record.text, record.title, record.source = "", None, None
    record.claimed_by = record.claim_token = record.lease_until = None


def page(session: Session, tenant: str, status: str | None, offset: int, limit: int) -> tuple[int, list[DocumentRecord]]:
    """The total and one page of a tenant's documents (optionally of one status), oldest first."""
    where = [DocumentRecord.tenant_id == tenant] + ([DocumentRecord.status == status] if status else [])
    total = int(session.scalar(select(func.count()).select_from(DocumentRecord).where(*where)))
    rows = session.scalars(select(DocumentRecord).where(*where)
                           .order_by(DocumentRecord.created_at, DocumentRecord.id).offset(offset).limit(limit))
    return total, list(rows)


@dataclass(frozen=True)
class Claim:
    token: str
    documents: list[DocumentRecord]


def release_claims(writes: sessionmaker[Session], worker_id: str) -> int:
    """Give back this worker's claims (it restarted: whatever it held was not finished)."""
    with writes.begin() as session:
        result = session.execute(
            update(DocumentRecord)
            .where(DocumentRecord.claimed_by == worker_id, DocumentRecord.status == "pending")
            .values(claimed_by=None, claim_token=None, lease_until=None)
        )
        return result.rowcount


def claim_batch(writes: sessionmaker[Session], worker_id: str, limit: int, lease_seconds: float) -> Claim:
    """Claim up to ``limit`` pending documents of any tenant, oldest first (a write transaction:
    on SQLite it holds the write lock from its first read, so two claimers never pick the same rows)."""
    now = utcnow()
    token = uuid.uuid4().hex
    claimable = or_(DocumentRecord.claim_token.is_(None), DocumentRecord.lease_until < now)
    with writes.begin() as session:
        keys = list(session.execute(
            select(DocumentRecord.tenant_id, DocumentRecord.id)
            .where(DocumentRecord.status == "pending", claimable)
            .order_by(DocumentRecord.created_at, DocumentRecord.tenant_id, DocumentRecord.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ))
        for tenant, doc_id in keys:
            session.execute(
                update(DocumentRecord)
                .where(DocumentRecord.tenant_id == tenant, DocumentRecord.id == doc_id,
                       DocumentRecord.status == "pending", claimable)
                .values(claimed_by=worker_id, claim_token=token, lease_until=now + timedelta(seconds=lease_seconds),
                        attempts=DocumentRecord.attempts + 1)
                .execution_options(synchronize_session=False)
            )
        if not keys:
            return Claim(token, [])
        docs = list(session.scalars(
            select(DocumentRecord).where(DocumentRecord.claim_token == token)
            .order_by(DocumentRecord.created_at, DocumentRecord.tenant_id, DocumentRecord.id)
        ))
    return Claim(token, docs)


def _claimed(doc: DocumentRecord, token: str):
    return (DocumentRecord.tenant_id == doc.tenant_id, DocumentRecord.id == doc.id, DocumentRecord.claim_token == token)


def finish(session: Session, doc: DocumentRecord, token: str, **values) -> bool:
    """Mark a claimed document ingested (inside the caller's transaction); False if the claim is stale."""
    result = session.execute(
        update(DocumentRecord)
        .where(*_claimed(doc, token), DocumentRecord.status == "pending")
        .values(status="ingested", ingested_at=utcnow(), claimed_by=None, claim_token=None, lease_until=None,
                failure_reason=None, **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def fail_attempt(writes: sessionmaker[Session], doc: DocumentRecord, token: str, reason: str, max_attempts: int) -> None:
    """Record a failed attempt: back to the queue, or ``failed`` after ``max_attempts``."""
    with writes.begin() as session:
        row = get(session, doc.tenant_id, doc.id)
        if row is None or row.claim_token != token or row.status != "pending":
            return
        row.failure_reason = reason[:2000]
        row.claimed_by = row.claim_token = row.lease_until = None
        if row.attempts >= max_attempts:
            row.status = "failed"


def release_claim(writes: sessionmaker[Session], doc: DocumentRecord, token: str) -> None:
    """Give one claimed document back to the queue without counting the attempt."""
    with writes.begin() as session:
        session.execute(update(DocumentRecord).where(*_claimed(doc, token))
                        .values(claimed_by=None, claim_token=None, lease_until=None,
                                attempts=DocumentRecord.attempts - 1))


def ingested(session: Session, tenant: str, ids: list[str] | None = None) -> list[DocumentRecord]:
    """A tenant's ingested documents (all, or those of ``ids``), in ingest order."""
    query = select(DocumentRecord).where(DocumentRecord.tenant_id == tenant, DocumentRecord.status == "ingested")
    if ids is not None:
        query = query.where(DocumentRecord.id.in_(ids))
    return list(session.scalars(query.order_by(DocumentRecord.ingested_at, DocumentRecord.id)))


def ingested_hashes(session: Session, tenant: str) -> dict[str, str]:
    """Id -> content hash of a tenant's ingested documents (what its retrieval index should hold)."""
    return dict(session.execute(select(DocumentRecord.id, DocumentRecord.content_hash).where(
        DocumentRecord.tenant_id == tenant, DocumentRecord.status == "ingested")).all())


def corpus_versions(session: Session) -> dict[str, tuple]:
    """Per tenant, a value that changes whenever a document becomes answerable or is deleted."""
    rows = session.execute(
        select(DocumentRecord.tenant_id, func.count(), func.max(DocumentRecord.ingested_at),
               func.max(DocumentRecord.deleted_at))
        .where(DocumentRecord.status.in_(("ingested", "deleted"))).group_by(DocumentRecord.tenant_id))
    return {tenant: (int(n), newest, deleted) for tenant, n, newest, deleted in rows}


def ids_with_memory(session: Session, tenant: str) -> set[str]:
    """A tenant's ingested documents whose memory entry SQL says was written."""
    return set(session.scalars(select(DocumentRecord.id).where(
        DocumentRecord.tenant_id == tenant, DocumentRecord.status == "ingested", DocumentRecord.memory_written.is_(True))))


def count_with_memory(session: Session) -> dict[str, int]:
    """Per tenant, the ingested documents that have a memory entry."""
    rows = session.execute(select(DocumentRecord.tenant_id, func.count()).where(
        DocumentRecord.status == "ingested", DocumentRecord.memory_written.is_(True)).group_by(DocumentRecord.tenant_id))
    return {tenant: int(n) for tenant, n in rows}


def count_ingested(session: Session) -> dict[str, int]:
    """Per tenant, the ingested documents."""
    rows = session.execute(select(DocumentRecord.tenant_id, func.count()).where(
        DocumentRecord.status == "ingested").group_by(DocumentRecord.tenant_id))
    return {tenant: int(n) for tenant, n in rows}


def mark_memory_written(session: Session, tenant: str, ids: list[str]) -> None:
    session.execute(update(DocumentRecord).where(DocumentRecord.tenant_id == tenant, DocumentRecord.id.in_(ids))
                    .values(memory_written=True).execution_options(synchronize_session=False))


def not_deleted(session: Session, tenant: str, ids: list[str]) -> set[str]:
    return set(session.scalars(select(DocumentRecord.id).where(
        DocumentRecord.tenant_id == tenant, DocumentRecord.id.in_(sorted(ids)), DocumentRecord.status != "deleted")))


def queue_depth(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(DocumentRecord).where(DocumentRecord.status == "pending")))


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(DocumentRecord.status, func.count()).group_by(DocumentRecord.status))
    return {status: int(n) for status, n in rows}

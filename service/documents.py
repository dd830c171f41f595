"""Every change of a document's state, in one place: stored by the API (pending), claimed and
finished by the worker (ingested / failed), deleted by an admin.

The ingest queue is the ``documents`` table: claim pending rows with a lease, finish them. A row
stays ``pending`` until the work on it is committed, so a worker killed mid-document leaves it
claimable again: its own claims are released when it restarts (same ``worker_id``), anyone else's
once the lease runs out. Finishing is conditional on the claim token, so a row deleted or taken
over meanwhile is never marked by a stale worker.
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


def store_batch(session: Session, docs) -> list[Stored]:
    """Queue a batch of documents (objects with id, text, title, source, published_at) in the
    caller's transaction: new ids and re-posted deleted ids become ``pending``; the same id with the
    same content is a no-op; the same id with other content raises ``ConflictingDocuments``."""
    hashes: dict[str, str] = {}
    for d in docs:
        h = content_hash(d.text, d.title, d.source, d.published_at)
        if hashes.setdefault(d.id, h) != h:
            raise ConflictingDocuments(f"document {d.id!r} appears twice in the batch with different content")
    existing = {r.id: r for r in session.scalars(select(DocumentRecord).where(DocumentRecord.id.in_(list(hashes))))}
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
            record = DocumentRecord(id=d.id, created_at=now)
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


@dataclass(frozen=True)
class Claim:
    token: str
    documents: list[DocumentRecord]


def release_claims(sessions: sessionmaker[Session], worker_id: str) -> int:
    """Give back this worker's claims (it restarted: whatever it held was not finished)."""
    with sessions.begin() as session:
        result = session.execute(
            update(DocumentRecord)
            .where(DocumentRecord.claimed_by == worker_id, DocumentRecord.status == "pending")
            .values(claimed_by=None, claim_token=None, lease_until=None)
        )
        return result.rowcount


def claim_batch(sessions: sessionmaker[Session], worker_id: str, limit: int, lease_seconds: float) -> Claim:
    """Claim up to ``limit`` pending documents, oldest first."""
    now = utcnow()
    token = uuid.uuid4().hex
    claimable = or_(DocumentRecord.claim_token.is_(None), DocumentRecord.lease_until < now)
    with sessions.begin() as session:
        ids = list(session.scalars(
            select(DocumentRecord.id)
            .where(DocumentRecord.status == "pending", claimable)
            .order_by(DocumentRecord.created_at, DocumentRecord.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ))
        if not ids:
            return Claim(token, [])
        session.execute(
            update(DocumentRecord)
            .where(DocumentRecord.id.in_(ids), DocumentRecord.status == "pending", claimable)
            .values(claimed_by=worker_id, claim_token=token, lease_until=now + timedelta(seconds=lease_seconds),
                    attempts=DocumentRecord.attempts + 1)
            .execution_options(synchronize_session=False)
        )
    with sessions() as session:
        docs = list(session.scalars(
            select(DocumentRecord).where(DocumentRecord.claim_token == token)
            .order_by(DocumentRecord.created_at, DocumentRecord.id)
        ))
    return Claim(token, docs)


def finish(session: Session, doc_id: str, token: str, **values) -> bool:
    """Mark a claimed document ingested (inside the caller's transaction); False if the claim is stale."""
    result = session.execute(
        update(DocumentRecord)
        .where(DocumentRecord.id == doc_id, DocumentRecord.claim_token == token, DocumentRecord.status == "pending")
        .values(status="ingested", ingested_at=utcnow(), claimed_by=None, claim_token=None, lease_until=None,
                failure_reason=None, **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def fail_attempt(sessions: sessionmaker[Session], doc_id: str, token: str, reason: str, max_attempts: int) -> None:
    """Record a failed attempt: back to the queue, or ``failed`` after ``max_attempts``."""
    with sessions.begin() as session:
        doc = session.get(DocumentRecord, doc_id)
        if doc is None or doc.claim_token != token or doc.status != "pending":
            return
        doc.failure_reason = reason[:2000]
        doc.claimed_by = doc.claim_token = doc.lease_until = None
        if doc.attempts >= max_attempts:
            doc.status = "failed"


def release_claim(sessions: sessionmaker[Session], doc_id: str, token: str) -> None:
    """Give one claimed document back to the queue without counting the attempt."""
    with sessions.begin() as session:
        session.execute(update(DocumentRecord).where(DocumentRecord.id == doc_id, DocumentRecord.claim_token == token)
                        .values(claimed_by=None, claim_token=None, lease_until=None,
                                attempts=DocumentRecord.attempts - 1))


def ingested(session: Session, ids: list[str] | None = None) -> list[DocumentRecord]:
    """Ingested documents (all, or those of ``ids``), in ingest order."""
    query = select(DocumentRecord).where(DocumentRecord.status == "ingested")
    if ids is not None:
        query = query.where(DocumentRecord.id.in_(ids))
    return list(session.scalars(query.order_by(DocumentRecord.ingested_at, DocumentRecord.id)))


def ids_with_memory(session: Session) -> set[str]:
    """Ingested documents whose memory entry SQL says was written."""
    return set(session.scalars(select(DocumentRecord.id).where(
        DocumentRecord.status == "ingested", DocumentRecord.memory_written.is_(True))))


def count_with_memory(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(DocumentRecord).where(
        DocumentRecord.status == "ingested", DocumentRecord.memory_written.is_(True))))


def mark_memory_written(session: Session, ids: list[str]) -> None:
    session.execute(update(DocumentRecord).where(DocumentRecord.id.in_(ids))
                    .values(memory_written=True).execution_options(synchronize_session=False))


def not_deleted(session: Session, ids: list[str]) -> set[str]:
    return set(session.scalars(select(DocumentRecord.id).where(
        DocumentRecord.id.in_(sorted(ids)), DocumentRecord.status != "deleted")))


def queue_depth(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(DocumentRecord).where(DocumentRecord.status == "pending")))


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(DocumentRecord.status, func.count()).group_by(DocumentRecord.status))
    return {status: int(n) for status, n in rows}

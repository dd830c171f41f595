"""The ingest queue is the ``documents`` table: claim pending rows with a lease, finish them.

A row stays ``pending`` until the work on it is committed, so a worker killed mid-document leaves
it claimable again: its own claims are released when it restarts (same ``worker_id``), anyone
else's once the lease runs out. Finishing is conditional on the claim token, so a row deleted or
taken over meanwhile is never marked by a stale worker.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import DocumentRecord, utcnow


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


def queue_depth(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(DocumentRecord).where(DocumentRecord.status == "pending")))


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(DocumentRecord.status, func.count()).group_by(DocumentRecord.status))
    return {status: int(n) for status, n in rows}

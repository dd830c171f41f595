"""Document lifecycle: post a batch (durable before the 202), read status, list, delete."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, status
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from service import documents as repository
from service.adapters import store
from service.api.deps import AdminDep, MetricsDep, SessionDep, SettingsDep
from service.api.schemas import (
    DocumentDeleted, DocumentOut, DocumentPage, DocumentsAccepted, DocumentsIn, DocumentStatus, ErrorOut, Status,
)
from service.core.errors import Conflict, NotFound, TooLarge
from service.db import DocumentRecord

router = APIRouter(prefix="/documents", tags=["documents"])
ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}}


def _out(record: DocumentRecord, with_text: bool = True) -> DocumentOut:
    return DocumentOut(
        id=record.id, status=record.status, failure_reason=record.failure_reason, attempts=record.attempts,
        title=record.title, source=record.source, published_at=record.published_at,
        memory_written=record.memory_written, adapter_version=record.adapter_version,
        adapter_note=record.adapter_note, created_at=record.created_at, ingested_at=record.ingested_at,
        deleted_at=record.deleted_at, text=record.text if with_text else None,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DocumentsAccepted,
    responses={400: {"model": ErrorOut}, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
               **ERRORS},
)
def post_documents(body: DocumentsIn, session: SessionDep, settings: SettingsDep, metrics: MetricsDep, request: Request):
    """Store a batch of documents for ingestion. All-or-nothing, committed before the 202.

    Each document gets a status URL to poll (pending -> ingested / failed). Re-posting a document
    with the same id and content is a no-op returning the existing record (`created: false`);
    the same id with different content is a 409 conflict.
    """
    docs = body.documents
    if len(docs) > settings.max_batch_documents:
        raise TooLarge(f"batch of {len(docs)} documents exceeds the limit of {settings.max_batch_documents}; "
                       "split it into smaller batches")
    too_long = [d.id for d in docs if len(d.text) > settings.max_document_chars]
    if too_long:
        raise TooLarge(f"documents {too_long} exceed {settings.max_document_chars} characters of text")
    try:
        stored = repository.store_batch(session, docs)
        session.commit()
    except repository.ConflictingDocuments as exc:
        raise Conflict(str(exc)) from None
    except IntegrityError:  # a concurrent request inserted one of these ids first
        session.rollback()
        raise Conflict("a document with one of these ids was stored concurrently; retry") from None
    created = sum(s.created for s in stored)
    statuses = [DocumentStatus(id=s.id, status=s.status, created=s.created,
                               status_url=str(request.url_for("get_document", doc_id=s.id))) for s in stored]
    metrics.documents_posted.inc(created)
    return DocumentsAccepted(documents=statuses)


@router.get("", response_model=DocumentPage, responses=ERRORS)
def list_documents(
    session: SessionDep,
    status_: Status | None = Query(None, alias="status", description="only documents in this state"),
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(50, ge=1, le=500),
):
    """Documents, oldest first, without their text (read one document for it)."""
    query = select(DocumentRecord)
    count = select(func.count()).select_from(DocumentRecord)
    if status_ is not None:
        query, count = query.where(DocumentRecord.status == status_), count.where(DocumentRecord.status == status_)
    total = int(session.scalar(count))
    rows = session.scalars(query.order_by(DocumentRecord.created_at, DocumentRecord.id).offset(offset).limit(limit))
    items = [_out(r, with_text=False) for r in rows]
    next_offset = offset + len(items) if offset + len(items) < total else None
    return DocumentPage(items=items, total=total, offset=offset, limit=limit, next_offset=next_offset)


@router.get("/{doc_id}", response_model=DocumentOut, responses={404: {"model": ErrorOut}, **ERRORS})
def get_document(doc_id: str, session: SessionDep):
    """One document with its ingest status (pending / ingested / failed with the reason / deleted)."""
    record = session.get(DocumentRecord, doc_id)
    if record is None:
        raise NotFound(f"no document with id {doc_id!r}")
    return _out(record)


@router.delete("/{doc_id}", response_model=DocumentDeleted, responses={404: {"model": ErrorOut}, **ERRORS},
               dependencies=[AdminDep])
def delete_document(doc_id: str, session: SessionDep, request: Request):
    """Delete a document (admin): its text is erased, its memory entry removed at once, and it
    leaves retrieval. An adapter update cannot be subtracted: the response says whether the live
    adapter absorbed it, and ``POST /adapters/rebuild`` replays the adapter without it."""
    record = session.get(DocumentRecord, doc_id)
    if record is None:
        raise NotFound(f"no document with id {doc_id!r}")
    repository.mark_deleted(session, record)
    live = store.active_version(session)
    absorbed = store.absorbed_by(session, doc_id, live)
    session.commit()
    mac = request.app.state.runtime.mac
    removed = mac.delete(doc_id) if mac is not None else False
    return DocumentDeleted(id=doc_id, status="deleted", memory_entry_removed=removed,
                           absorbed_by_live_adapter=absorbed, live_adapter_version=live,
                           rebuild_adapter_url=str(request.url_for("rebuild_adapter")) if absorbed else None)

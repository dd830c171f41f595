"""Ingest and read documents."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.api.deps import SessionDep, SettingsDep
from service.api.schemas import DocumentOut, DocumentsAccepted, DocumentsIn, DocumentStatus, ErrorOut
from service.db import DocumentRecord, content_hash

router = APIRouter(prefix="/documents", tags=["documents"])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DocumentsAccepted,
    responses={409: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
def ingest_documents(body: DocumentsIn, session: SessionDep, settings: SettingsDep, request: Request):
    """Store a batch of documents. The batch is all-or-nothing and durable before the response.

    Re-posting a document with the same id and content is a no-op (`unchanged`); the same id
    with different content is a 409 conflict.
    """
    docs = body.documents
    if len(docs) > settings.max_batch_documents:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"batch of {len(docs)} documents exceeds the limit of {settings.max_batch_documents}; "
            "split it into smaller batches",
        )
    too_long = [d.id for d in docs if len(d.text) > settings.max_document_chars]
    if too_long:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"documents {too_long} exceed {settings.max_document_chars} characters of text",
        )
    hashes = {}
    for d in docs:
        h = content_hash(d.text, d.title, d.source, d.published_at)
        if hashes.setdefault(d.id, h) != h:
            raise HTTPException(status.HTTP_409_CONFLICT, f"document {d.id!r} appears twice in the batch with different content")

    existing = {
        r.id: r for r in session.scalars(select(DocumentRecord).where(DocumentRecord.id.in_(list(hashes))))
    }
    conflicts = sorted(i for i, r in existing.items() if r.content_hash != hashes[i])
    if conflicts:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"documents {conflicts} already exist with different content; use new ids or delete them first",
        )
    statuses, seen = [], set()
    for d in docs:
        if d.id in seen:
            continue
        seen.add(d.id)
        if d.id in existing:
            state = "unchanged"
        else:
            state = "ingested"
            session.add(
                DocumentRecord(
                    id=d.id, text=d.text, title=d.title, source=d.source,
                    published_at=d.published_at, content_hash=hashes[d.id], status="ingested",
                )
            )
        statuses.append(DocumentStatus(id=d.id, status=state, status_url=str(request.url_for("get_document", doc_id=d.id))))
    try:
        session.commit()
    except IntegrityError:  # a concurrent request inserted one of these ids first
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "a document with one of these ids was stored concurrently; retry") from None
    return DocumentsAccepted(documents=statuses)


@router.get("/{doc_id}", response_model=DocumentOut, responses={404: {"model": ErrorOut}})
def get_document(doc_id: str, session: SessionDep):
    record = session.get(DocumentRecord, doc_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no document with id {doc_id!r}")
    return DocumentOut(
        id=record.id, title=record.title, source=record.source,
        published_at=record.published_at, status=record.status, text=record.text,
    )

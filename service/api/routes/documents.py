"""Document lifecycle of the caller's tenant: post a batch (durable before the 202), read status,
list, delete."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, status
from sqlalchemy.exc import IntegrityError

from service import documents as repository
from service.adapters import store
from service.api.deps import AdminDep, MetricsDep, RuntimeDep, SessionDep, SettingsDep, TenantDep, WriteSessionDep
from service.api.schemas import (
    DocumentDeleted, DocumentOut, DocumentPage, DocumentsAccepted, DocumentsIn, DocumentStatus, Status, errors,
)
from service.api.strict_json import StrictJSONRoute
from service.core.errors import Conflict, NotFound, TooLarge
from service.db import DocumentRecord, erase_deleted_text

router = APIRouter(prefix="/documents", tags=["documents"], route_class=StrictJSONRoute)


def _path(request: Request, name: str, **params: str) -> str:
    """A route's path relative to the service (never built from the request's Host header)."""
    return request.scope.get("root_path", "") + request.app.url_path_for(name, **params)


def _out(record: DocumentRecord, with_text: bool = True) -> DocumentOut:
    return DocumentOut(
        id=record.id, status=record.status, failure_reason=record.failure_reason, attempts=record.attempts,
        title=record.title, source=record.source, published_at=record.published_at,
        memory_written=record.memory_written, adapter_version=record.adapter_version,
        adapter_note=record.adapter_note, created_at=record.created_at, ingested_at=record.ingested_at,
        deleted_at=record.deleted_at, text=record.text if with_text else None,
    )


async def batch_within_limit(request: Request, settings: SettingsDep) -> None:
    """The batch size, checked on the parsed JSON before any document is validated (FastAPI solves
    dependencies before the body model): an oversized batch costs one count, not one validation
    error per document."""
    body = await request.json()  # parsed once already; Starlette caches it
    batch = body.get("documents") if isinstance(body, dict) else None
    if isinstance(batch, list) and len(batch) > settings.max_batch_documents:
        raise TooLarge(f"batch of {len(batch)} documents exceeds the limit of {settings.max_batch_documents}; "
                       "split it into smaller batches")


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DocumentsAccepted,
    responses=errors(409, 422),
    dependencies=[Depends(batch_within_limit)],
)
def post_documents(body: DocumentsIn, tenant: TenantDep, session: WriteSessionDep, settings: SettingsDep,
                   metrics: MetricsDep, request: Request):
    """Store a batch of documents for ingestion. All-or-nothing, committed before the 202.

    Each document gets a status URL to poll (pending -> ingested / failed). Re-posting a document
    with the same id and content is a no-op returning the existing record (`created: false`);
    the same id with different content is a 409 conflict. Limits: the body size
    (`FRESHLM_MAX_BODY_BYTES`), the batch (`FRESHLM_MAX_BATCH_DOCUMENTS`, checked first) and the
    text of each document (`FRESHLM_MAX_DOCUMENT_CHARS`): 413.
    """
    docs = body.documents
    too_long = [d.id for d in docs if len(d.text) > settings.max_document_chars]
    if too_long:
        raise TooLarge(f"documents {too_long[:10]} exceed {settings.max_document_chars} characters of text")
    try:
        stored = repository.store_batch(session, tenant, docs)
        session.commit()
    except repository.ConflictingDocuments as exc:
        raise Conflict(str(exc)) from None
    except IntegrityError:  # a concurrent request inserted one of these ids first
        session.rollback()
        raise Conflict("a document with one of these ids was stored concurrently; retry") from None
    created = sum(s.created for s in stored)
    statuses = [DocumentStatus(id=s.id, status=s.status, created=s.created,
                               status_url=_path(request, "get_document", doc_id=s.id)) for s in stored]
    metrics.documents_posted.inc(created)
    return DocumentsAccepted(documents=statuses)


@router.get("", response_model=DocumentPage, responses=errors())
def list_documents(
    tenant: TenantDep,
    session: SessionDep,
    status_: Status | None = Query(None, alias="status", description="only documents in this state"),
    offset: int = Query(0, ge=0, le=10**9),
    limit: int = Query(50, ge=1, le=500),
):
    """The tenant's documents, oldest first, without their text (read one document for it)."""
    total, rows = repository.page(session, tenant, status_, offset, limit)
    items = [_out(r, with_text=False) for r in rows]
    next_offset = offset + len(items) if offset + len(items) < total else None
    return DocumentPage(items=items, total=total, offset=offset, limit=limit, next_offset=next_offset)


@router.get("/{doc_id}", response_model=DocumentOut, responses=errors(404))
def get_document(doc_id: str, tenant: TenantDep, session: SessionDep):
    """One document with its ingest status (pending / ingested / failed with the reason / deleted)."""
    record = repository.get(session, tenant, doc_id)
    if record is None:
        raise NotFound(f"no document with id {doc_id[:200]!r}")
    return _out(record)


@router.delete("/{doc_id}", response_model=DocumentDeleted, responses=errors(403, 404))
def delete_document(doc_id: str, principal: AdminDep, session: WriteSessionDep, runtime: RuntimeDep, request: Request):
    """Delete a document (admin): its text is erased (from the database files too), its memory
    entry and update-bank entry removed at once, and it leaves retrieval. An update absorbed by the
    live adapter cannot be subtracted: the response says whether it was, and ``POST
    /adapters/rebuild`` replays the adapter without it."""
    tenant = principal.tenant
    record = repository.get(session, tenant, doc_id)
    if record is None:
        raise NotFound(f"no document with id {doc_id[:200]!r}")
    repository.mark_deleted(session, record)
    live = store.active_version(session, tenant)
    absorbed = store.absorbed_by(session, tenant, doc_id, live)
    session.commit()
    erase_deleted_text(runtime.db)
    request.app.state.index.remove(tenant, doc_id)
    mac, bank = runtime.mac_for(tenant), runtime.bank_for(tenant)
    removed = mac.delete(doc_id) if mac is not None else False
    return DocumentDeleted(id=doc_id, status="deleted", memory_entry_removed=removed,
                           update_entry_removed=bank.delete(doc_id) if bank is not None else False,
                           absorbed_by_live_adapter=absorbed, live_adapter_version=live,
                           rebuild_adapter_url=_path(request, "rebuild_adapter") if absorbed else None)

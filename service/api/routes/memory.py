"""The MAC memory bank: its size, and a full rebuild from SQL on request."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from service.api.deps import AdminDep, SessionDep
from service.api.schemas import Accepted, ErrorOut
from service.core.errors import BadRequest
from service.db import set_state
from service.ingest_worker import REBUILD_MEMORY_KEY

router = APIRouter(prefix="/memory", tags=["memory"])


@router.post("/rebuild", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted,
             responses={400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 403: {"model": ErrorOut}},
             dependencies=[AdminDep])
def rebuild_memory(session: SessionDep, request: Request):
    """Ask the worker (admin) to re-derive every memory entry from the stored documents."""
    if getattr(request.app.state, "mac", None) is None:
        raise BadRequest("no MAC artifact is configured: there is no memory bank to rebuild")
    set_state(session, REBUILD_MEMORY_KEY, "requested")
    session.commit()
    return Accepted(detail="the worker will rebuild the memory bank from SQL")

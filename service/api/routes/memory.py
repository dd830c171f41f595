"""The MAC memory bank: its size, and a full rebuild from SQL on request."""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from service.api.deps import AdminDep, SessionDep
from service.api.schemas import Accepted, ErrorOut
from service.core.errors import BadRequest
from service.db import REBUILD_MEMORY_KEY, set_state

router = APIRouter(prefix="/memory", tags=["memory"])


@router.post("/rebuild", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted,
             responses={400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 403: {"model": ErrorOut}},
             dependencies=[AdminDep])
def rebuild_memory(session: SessionDep, request: Request):
    """Ask the worker (admin) to re-derive every memory entry from the stored documents."""
    if request.app.state.runtime.mac is None:
        raise BadRequest("no MAC artifact is configured: there is no memory bank to rebuild")
    set_state(session, REBUILD_MEMORY_KEY, "requested")
    session.commit()
    return Accepted(detail="the worker will rebuild the memory bank from SQL")

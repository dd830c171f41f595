"""The tenant's MAC memory bank and update bank: a full rebuild from SQL on request."""

from __future__ import annotations

from fastapi import APIRouter, status

from service.api.deps import AdminDep, RuntimeDep, WriteSessionDep
from service.api.schemas import Accepted, errors
from service.core.errors import BadRequest
from service.db import REBUILD_MEMORY_KEY, set_state

router = APIRouter(prefix="/memory", tags=["memory"])


@router.post("/rebuild", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted, responses=errors(400, 403))
def rebuild_memory(principal: AdminDep, session: WriteSessionDep, runtime: RuntimeDep):
    """Ask the worker (admin) to re-derive every memory entry (and update-bank entry) of the tenant
    from its stored documents."""
    if runtime.mac is None and runtime.update_bank is None:
        raise BadRequest("no MAC artifact and no update bank are configured: there is no memory bank to rebuild")
    set_state(session, principal.tenant, REBUILD_MEMORY_KEY, "requested")
    session.commit()
    return Accepted(detail="the worker will rebuild the memory bank from SQL")

"""Tenants and their API keys, managed at run time (no restart): the operator (an admin key of the
default tenant) creates tenants; the operator or a tenant's own admin issues, lists and revokes
that tenant's keys. Rotating a key = issue the new one, move clients over, revoke the old one."""

from __future__ import annotations

from fastapi import APIRouter, Path, status

from service import tenants
from service.api.deps import AdminDep, SessionDep, WriteSessionDep
from service.api.schemas import IssuedKey, KeyIn, KeyOut, TenantIn, TenantOut, errors
from service.api.strict_json import StrictJSONRoute
from service.core.errors import BadRequest, Conflict, Forbidden, NotFound
from service.core.security import Principal
from service.db import TENANT_ID_PATTERN, ApiKeyRecord

router = APIRouter(prefix="/tenants", tags=["tenants"], route_class=StrictJSONRoute)
TenantId = Path(pattern=TENANT_ID_PATTERN, max_length=64)


def _managed(principal: Principal, tenant: str | None = None) -> None:
    """The operator manages every tenant; a tenant's admin only its own keys. Never in the open
    mode: an anonymous caller must not be able to turn API keys on."""
    if principal.open:
        raise BadRequest("tenants need API keys: start the service with FRESHLM_ADMIN_API_KEYS set")
    if not (principal.is_operator or tenant == principal.tenant):
        raise Forbidden("this operation needs the operator's key (an admin key of the default tenant)")


def _key(record: ApiKeyRecord) -> KeyOut:
    return KeyOut(id=record.id, tenant=record.tenant_id, role=record.role, created_at=record.created_at,
                  revoked_at=record.revoked_at)


def _existing(session, tenant: str) -> None:
    if tenants.get_tenant(session, tenant) is None:
        raise NotFound(f"no tenant {tenant!r}")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TenantOut, responses=errors(400, 403, 409, 422))
def create_tenant(body: TenantIn, principal: AdminDep, session: WriteSessionDep):
    """Create a tenant (operator). It starts empty: no documents, no memory, its own adapter lineage."""
    _managed(principal)
    try:
        record = tenants.create_tenant(session, body.id, body.name)
        session.commit()
    except tenants.TenantExists:
        raise Conflict(f"tenant {body.id!r} already exists") from None
    return TenantOut(id=record.id, name=record.name, created_at=record.created_at)


@router.get("", response_model=list[TenantOut], responses=errors(400, 403))
def list_tenants(principal: AdminDep, session: SessionDep):
    """Every tenant (operator)."""
    _managed(principal)
    return [TenantOut(id=t.id, name=t.name, created_at=t.created_at) for t in tenants.list_tenants(session)]


@router.post("/{tenant}/keys", status_code=status.HTTP_201_CREATED, response_model=IssuedKey,
             responses=errors(400, 403, 404, 422))
def issue_key(body: KeyIn, principal: AdminDep, session: WriteSessionDep, tenant: str = TenantId):
    """Issue a key of the tenant; the response is the only time the key is shown."""
    _managed(principal, tenant)
    _existing(session, tenant)
    record, key = tenants.issue_key(session, tenant, body.role)
    session.commit()
    return IssuedKey(**_key(record).model_dump(), key=key)


@router.get("/{tenant}/keys", response_model=list[KeyOut], responses=errors(400, 403, 404))
def list_keys(principal: AdminDep, session: SessionDep, tenant: str = TenantId):
    """The tenant's keys (ids and roles, never the keys), revoked ones included."""
    _managed(principal, tenant)
    _existing(session, tenant)
    return [_key(r) for r in tenants.list_keys(session, tenant)]


@router.delete("/{tenant}/keys/{key_id}", response_model=KeyOut, responses=errors(400, 403, 404))
def revoke_key(principal: AdminDep, session: WriteSessionDep, tenant: str = TenantId,
               key_id: str = Path(pattern=r"^[0-9a-f]{16}$")):
    """Revoke a key: requests with it are refused from now on."""
    _managed(principal, tenant)
    record = tenants.revoke_key(session, tenant, key_id)
    if record is None:
        raise NotFound(f"tenant {tenant!r} has no key {key_id!r}")
    session.commit()
    return _key(record)

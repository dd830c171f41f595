"""Tenants and their API keys: created and rotated by an admin at run time, checked on every request.

A key is shown once, when it is issued (``flm_<id>_<secret>``); SQL keeps its SHA-256 only. The
``FRESHLM_API_KEYS`` / ``FRESHLM_ADMIN_API_KEYS`` settings stay as the bootstrap keys of the default
tenant (an admin key of the default tenant is the operator's: it manages every tenant).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import ApiKeyRecord, TenantRecord, utcnow

ROLES = ("user", "admin")


class TenantExists(Exception):
    pass


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def create_tenant(session: Session, tenant_id: str, name: str | None) -> TenantRecord:
    if session.get(TenantRecord, tenant_id) is not None:
        raise TenantExists(tenant_id)
    record = TenantRecord(id=tenant_id, name=name, created_at=utcnow())
    session.add(record)
    return record


def get_tenant(session: Session, tenant_id: str) -> TenantRecord | None:
    return session.get(TenantRecord, tenant_id)


def list_tenants(session: Session) -> list[TenantRecord]:
    return list(session.scalars(select(TenantRecord).order_by(TenantRecord.created_at, TenantRecord.id)))


def tenant_ids(session: Session) -> list[str]:
    return list(session.scalars(select(TenantRecord.id).order_by(TenantRecord.id)))


def issue_key(session: Session, tenant_id: str, role: str) -> tuple[ApiKeyRecord, str]:
    """A new key of ``tenant_id`` (in the caller's transaction): its record and the key itself."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    key_id = uuid.uuid4().hex[:16]
    key = f"flm_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKeyRecord(id=key_id, tenant_id=tenant_id, key_hash=key_hash(key), role=role, created_at=utcnow())
    session.add(record)
    return record, key


def list_keys(session: Session, tenant_id: str) -> list[ApiKeyRecord]:
    return list(session.scalars(select(ApiKeyRecord).where(ApiKeyRecord.tenant_id == tenant_id)
                                .order_by(ApiKeyRecord.created_at, ApiKeyRecord.id)))


def revoke_key(session: Session, tenant_id: str, key_id: str) -> ApiKeyRecord | None:
    """Revoke a key (effective at once: every request looks its key up); None if unknown."""
    record = session.get(ApiKeyRecord, key_id)
    if record is None or record.tenant_id != tenant_id:
        return None
    if record.revoked_at is None:
        record.revoked_at = utcnow()
    return record


def find_key(session: Session, key: str) -> ApiKeyRecord | None:
    """The active key record of a presented key."""
    return session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.key_hash == key_hash(key),
                                                     ApiKeyRecord.revoked_at.is_(None)))


def any_active_key(session: Session) -> bool:
    return session.scalar(select(ApiKeyRecord.id).where(ApiKeyRecord.revoked_at.is_(None)).limit(1)) is not None

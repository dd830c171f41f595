"""Who is calling: every API key belongs to a tenant and has a role (user or admin).

* ``FRESHLM_API_KEYS`` / ``FRESHLM_ADMIN_API_KEYS``: user and admin keys of the default tenant
  (the bootstrap keys; an admin of the default tenant is the operator, who manages tenants).
* keys issued through ``/tenants/{tenant}/keys``: looked up by hash in SQL on every request, so a
  new or revoked key takes effect at once, without a restart.
* no key configured anywhere (no setting, no active key in SQL): the service is open, and every
  caller is an admin of the default tenant (the zero-configuration default).

Keys go in ``Authorization: Bearer <key>`` or ``X-API-Key``. Probes (/healthz, /readyz), /metrics
and the API docs stay open for the orchestrator; a valid key there only unlocks details.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from service import tenants
from service.core.config import Settings
from service.core.errors import Forbidden, Unauthorized
from service.db import DEFAULT_TENANT

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str
    open: bool = False  # no key is configured anywhere

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_operator(self) -> bool:
        """Manages tenants: an admin of the default tenant (never the anonymous open mode)."""
        return self.is_admin and self.tenant == DEFAULT_TENANT and not self.open


def presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


def _matches(key: str, allowed: list[str]) -> bool:
    return any(hmac.compare_digest(key.encode("utf-8", "surrogatepass"), k.encode()) for k in allowed)


def authenticate(settings: Settings, sessions: sessionmaker[Session], key: str | None) -> Principal | None:
    """The principal of a presented key (None: no valid key), or the open mode's."""
    if key:
        if _matches(key, settings.admin_api_keys):
            return Principal(DEFAULT_TENANT, "admin")
        if _matches(key, settings.api_keys):
            return Principal(DEFAULT_TENANT, "user")
    bootstrap = bool(settings.api_keys or settings.admin_api_keys)
    with sessions() as session:
        record = tenants.find_key(session, key) if key else None
        if record is not None:
            return Principal(record.tenant_id, record.role)
        if not bootstrap and not tenants.any_active_key(session):
            return Principal(DEFAULT_TENANT, "admin", open=True)
    return None


def unauthorized() -> Unauthorized:
    return Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise Forbidden("this operation needs an admin API key")

"""The tenant's adapter versions: list them, roll back (activate an older one), ask for a rebuild."""

from __future__ import annotations

from fastapi import APIRouter, Path, status

from service.adapters import store
from service.api.deps import AdminDep, SessionDep, SettingsDep, TenantDep, WriteSessionDep
from service.api.schemas import Accepted, AdapterOut, AdaptersOut, errors
from service.core.config import Settings
from service.core.errors import BadRequest, Conflict, NotFound
from service.db import REBUILD_ADAPTER_KEY, set_state

router = APIRouter(prefix="/adapters", tags=["adapters"])


def _out(row, active: str | None, settings: Settings) -> AdapterOut:
    return AdapterOut(version=row.version, parent=row.parent, kind=row.kind, documents=row.documents or [],
                      metrics=row.metrics or {}, created_at=row.created_at, active=row.version == active,
                      weights_available=store.has_weights(settings.adapters_dir, row.version))


@router.get("", response_model=AdaptersOut, responses=errors())
def list_adapters(tenant: TenantDep, session: SessionDep, settings: SettingsDep):
    """The tenant's adapter versions (immutable, content-addressed), oldest first, and its active one."""
    active = store.active_version(session, tenant)
    return AdaptersOut(active=active,
                       versions=[_out(r, active, settings) for r in store.list_versions(session, tenant)])


@router.post("/rebuild", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted,
             responses=errors(400, 403), name="rebuild_adapter")
def rebuild_adapter(principal: AdminDep, session: WriteSessionDep, settings: SettingsDep):
    """Ask the worker (admin) to replay every live document of the tenant into a new version from
    the initial one: the way to take deleted documents out of the adapter. The new version becomes
    active. 400 when no updater is configured (nothing would run)."""
    if settings.updater_spec is None:
        raise BadRequest("no updater is configured (FRESHLM_UPDATER): there is no adapter to rebuild")
    if settings.update_bank:
        raise BadRequest("the update bank (FRESHLM_UPDATE_BANK) keeps one entry per document, no adapter: "
                         "POST /memory/rebuild rewrites its entries")
    set_state(session, principal.tenant, REBUILD_ADAPTER_KEY, "requested")
    session.commit()
    return Accepted(detail="the worker will rebuild the adapter from the live documents; watch GET /adapters")


@router.post("/{version}/activate", response_model=AdapterOut, responses=errors(403, 404, 409))
def activate_adapter(principal: AdminDep, session: WriteSessionDep, settings: SettingsDep,
                     version: str = Path(max_length=64, pattern=r"^[0-9a-f]+$")):
    """Make ``version`` of the tenant's lineage the live adapter (admin): a rollback is a pointer
    flip. Questions already running finish on the version they started with. Versions older than
    the rollback window (``FRESHLM_ADAPTER_KEEP_VERSIONS``) have had their weights pruned: 409."""
    try:
        row = store.rollback_target(session, principal.tenant, settings.adapters_dir, version)
    except store.UnknownAdapterVersion as exc:
        raise NotFound(str(exc)) from None
    except store.PrunedAdapterVersion as exc:
        raise Conflict(f"{exc} (FRESHLM_ADAPTER_KEEP_VERSIONS={settings.adapter_keep_versions})") from None
    store.activate(session, principal.tenant, version)
    session.commit()
    return _out(row, version, settings)

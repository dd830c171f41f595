"""Adapter versions: list them, roll back (activate an older one), ask for a rebuild."""

from __future__ import annotations

from fastapi import APIRouter, Path, status

from service.adapters import store
from service.api.deps import AdminDep, SessionDep, SettingsDep
from service.api.schemas import Accepted, AdapterOut, AdaptersOut, ErrorOut
from service.core.config import Settings
from service.core.errors import BadRequest, Conflict, NotFound
from service.db import REBUILD_ADAPTER_KEY, set_state

router = APIRouter(prefix="/adapters", tags=["adapters"])
ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}}


def _out(row, active: str | None, settings: Settings) -> AdapterOut:
    return AdapterOut(version=row.version, parent=row.parent, kind=row.kind, documents=row.documents or [],
                      metrics=row.metrics or {}, created_at=row.created_at, active=row.version == active,
                      weights_available=store.has_weights(settings.adapters_dir, row.version))


@router.get("", response_model=AdaptersOut, responses=ERRORS)
def list_adapters(session: SessionDep, settings: SettingsDep):
    """Every adapter version (immutable, content-addressed), oldest first, and the active one."""
    active = store.active_version(session)
    return AdaptersOut(active=active,
                       versions=[_out(r, active, settings) for r in store.list_versions(session)])


@router.post("/rebuild", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted,
             responses={400: {"model": ErrorOut}, **ERRORS}, dependencies=[AdminDep], name="rebuild_adapter")
def rebuild_adapter(session: SessionDep, settings: SettingsDep):
    """Ask the worker (admin) to replay every live document into a new version from the initial one:
    the way to take deleted documents out of the adapter. The new version becomes active. 400 when
    no updater is configured (nothing would run)."""
    if settings.updater_spec is None:
        raise BadRequest("no updater is configured (FRESHLM_UPDATER): there is no adapter to rebuild")
    set_state(session, REBUILD_ADAPTER_KEY, "requested")
    session.commit()
    return Accepted(detail="the worker will rebuild the adapter from the live documents; watch GET /adapters")


@router.post("/{version}/activate", response_model=AdapterOut,
             responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}, **ERRORS}, dependencies=[AdminDep])
def activate_adapter(session: SessionDep, settings: SettingsDep,
                     version: str = Path(max_length=64, pattern=r"^[0-9a-f]+$")):
    """Make ``version`` the live adapter (admin): a rollback is a pointer flip. Questions already
    running finish on the version they started with. Versions older than the rollback window
    (``FRESHLM_ADAPTER_KEEP_VERSIONS``) have had their weights pruned: 409."""
    try:
        row = store.rollback_target(session, settings.adapters_dir, version)
    except store.UnknownAdapterVersion as exc:
        raise NotFound(str(exc)) from None
    except store.PrunedAdapterVersion as exc:
        raise Conflict(f"{exc} (FRESHLM_ADAPTER_KEEP_VERSIONS={settings.adapter_keep_versions})") from None
    store.activate(session, version)
    session.commit()
    return _out(row, version, settings)

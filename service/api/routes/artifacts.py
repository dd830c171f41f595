"""The artifact registry (``training.artifact_registry``): list the versions, activate one.

Artifacts are the deployment's, not a tenant's (every tenant answers with the same MAC artifact,
each over its own bank), so activating one is the operator's: an admin key of the default tenant
(or the open mode). Activating a MAC artifact is a roll forward or a rollback: the worker writes
its memory bank in the background and switches once it is complete; every API process follows
within ``FRESHLM_ARTIFACT_POLL_SECONDS``.
"""

from __future__ import annotations

from fastapi import APIRouter, Path

from service.api.deps import PrincipalDep, RuntimeDep
from service.api.schemas import ArtifactOut, ArtifactPointerOut, ArtifactsOut, errors
from service.core.errors import Conflict, Forbidden, NotFound
from service.core.security import Principal
from service.db import DEFAULT_TENANT
from training import artifact_registry as registry

router = APIRouter(prefix="/artifacts", tags=["artifacts"])


def _is_operator(principal: Principal) -> bool:
    return principal.is_admin and principal.tenant == DEFAULT_TENANT


def _out(row: dict, pointers: dict[str, dict], show_path: bool) -> ArtifactOut:
    p = pointers.get(row["kind"]) or {}
    return ArtifactOut(id=row["id"], kind=row["kind"], parent=row["parent"], source=row["source"],
                       base_model=row["base_model"], metrics=row["metrics"] or {}, created_at=row["created_at"],
                       active=p.get("active_id") == row["id"], serving=p.get("serving_id") == row["id"],
                       path=row["path"] if show_path else None)


def _pointer_out(p: dict) -> ArtifactPointerOut:
    return ArtifactPointerOut(kind=p["kind"], active=p["active_id"], serving=p["serving_id"], switch=p["progress"])


@router.get("", response_model=ArtifactsOut, responses=errors())
def list_artifacts(principal: PrincipalDep, runtime: RuntimeDep):
    """Every registered artifact version (oldest first) with lineage and metrics, and per kind the
    active one and the one serving answers (they differ while a MAC switch writes the new bank)."""
    engine = runtime.db.engine
    pointers = registry.pointers(engine)
    show = _is_operator(principal)
    return ArtifactsOut(pointers=[_pointer_out(p) for _, p in sorted(pointers.items())],
                        artifacts=[_out(r, pointers, show) for r in registry.list_artifacts(engine)])


@router.post("/{artifact_id}/activate", response_model=ArtifactPointerOut, responses=errors(403, 404, 409))
def activate_artifact(principal: PrincipalDep, runtime: RuntimeDep,
                      artifact_id: str = Path(min_length=64, max_length=64, pattern=r"^[0-9a-f]+$")):
    """Make an artifact the active one of its kind (the operator): roll forward or back. For MAC the
    worker writes the artifact's memory bank in the background; answers keep using the serving
    artifact until the bank is complete (``switch`` shows the progress, also in /readyz and
    /metrics). 404 for an unknown id; 409 for a kind read only at start, or an artifact whose
    directory is gone."""
    if not _is_operator(principal):
        raise Forbidden("artifacts are the deployment's: activating one needs the operator's key "
                        "(an admin key of the default tenant)")
    if registry.get(runtime.db.engine, artifact_id) is None:
        raise NotFound(f"no artifact {artifact_id!r}")
    try:
        return _pointer_out(registry.activate(runtime.db.engine, artifact_id))
    except registry.RegistryError as exc:
        raise Conflict(str(exc)) from None

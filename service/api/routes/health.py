"""Probes and metrics: /healthz (liveness), /readyz (can serve, and with what), /metrics.

The probes are open (the orchestrator calls them without a key), so what they show anyone is a
status per check; why a check fails (exception text, socket paths, SQL) and the deployment's
configuration go to the log and to admins only (an admin key, or the open mode).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.db import DEFAULT_TENANT
from service.migrate import current_revision, head_revision
from training import artifact_registry as registry
from training.packed_linear import PackedLinear
from training.pipeline import strategy_name
from training.precision import cpu_bf16_enabled, cpu_bf16_flags

router = APIRouter(tags=["ops"])
log = logging.getLogger("freshlm.health")


def _error(check: str, exc: Exception) -> str:
    log.warning("%s check failed: %s: %s", check, exc.__class__.__name__, exc)
    return f"error: {exc.__class__.__name__}: {exc}"


def _ping_database(rt) -> str:
    try:
        with rt.db.read() as session:
            session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # report any driver error as a failed check, never a 500
        return _error("database", exc)


def _ping_redis(rt) -> str:
    try:
        rt.redis.ping()
        return "ok"
    except Exception as exc:
        return _error("redis", exc)


def _for_caller(request: Request, checks: dict[str, str]) -> dict[str, str]:
    """Full reasons for an admin; anyone else sees which check failed, not why."""
    if _is_admin(request):
        return checks
    return {k: v if v == "ok" or not v.startswith("error") else "error (details in the service log)"
            for k, v in checks.items()}


def _is_admin(request: Request) -> bool:
    principal = getattr(request.state, "principal", None)
    return principal is not None and principal.is_admin


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", responses={503: {"description": "a dependency does not answer (the failing check is in the body)"}})
def healthz(request: Request) -> JSONResponse:
    """Liveness: the process is up and its database and Redis answer."""
    state = request.app.state
    rt = state.runtime
    checks = {"database": _ping_database(rt), "redis": _ping_redis(rt)}
    healthy = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if healthy else "unavailable", "checks": _for_caller(request, checks),
            "base_model": state.settings.base_model}
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", responses={503: {"description": "not ready: the failing checks say which"}})
def readyz(request: Request) -> JSONResponse:
    """Readiness: model, artifacts, database (schema at head), Redis, worker. 503 with the failing
    checks when something is missing. ``strategies`` says what /ask can do right now (for the
    caller's tenant); admins also see why a check fails and the configuration."""
    state = request.app.state
    settings, rt = state.settings, state.runtime
    checks: dict[str, str] = {"model": "ok"}
    checks["database"] = _ping_database(rt)
    if checks["database"] == "ok":
        try:
            current, head = current_revision(rt.db.engine), head_revision()
            checks["schema"] = "ok" if current == head else f"error: at revision {current}, code expects {head}"
        except Exception as exc:
            checks["schema"] = _error("schema", exc)
    checks["redis"] = _ping_redis(rt)
    if settings.mac_artifact_path is None:
        checks["mac_artifact"] = "not configured: answers use retrieval (and the adapter, if any)"
    else:
        checks["mac_artifact"] = "ok" if rt.mac is not None else f"error: {rt.errors.get('mac')}"
    if settings.updater_spec is None:
        checks["updater"] = "not configured: documents do not update the adapter"
    else:
        checks["updater"] = "ok" if "updater" not in rt.errors else f"error: {rt.errors['updater']}"
    if settings.update_bank:
        checks["update_bank"] = "ok" if rt.update_bank is not None else f"error: {rt.errors.get('update_bank')}"
    if settings.embedded_worker:
        thread = getattr(state, "worker_thread", None)
        alive = thread is not None and thread.is_alive()
        checks["worker"] = "ok" if alive else f"error: {rt.errors.get('worker', 'not running')}"
    else:
        checks["worker"] = "external: run freshlm-worker"
    ready = all(v == "ok" or not v.startswith("error") for v in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if checks["database"] == "ok":
        body["artifacts"] = artifact_status(rt)
    if checks["database"] == "ok":
        principal = getattr(request.state, "principal", None)
        tenant = principal.tenant if principal is not None else DEFAULT_TENANT
        try:
            body["strategies"] = sorted(state.answerer.available(tenant))
            body["auto"] = strategy_name(state.answerer.default_components(tenant))
        except Exception as exc:
            body["strategies"] = []
            checks["strategies"] = _error("strategies", exc)
    body["checks"] = _for_caller(request, checks)
    if _is_admin(request):
        body["configuration"] = configuration(settings, rt)
    return JSONResponse(body, status_code=200 if ready else 503)


def artifact_status(rt) -> dict:
    """Per kind: active and serving artifact, the one this process answers with, and a MAC switch's
    progress (entries of the new bank written / to write)."""
    try:
        pointers = registry.pointers(rt.db.engine)
    except Exception as exc:
        return {"error": _error("artifacts", exc)}
    return {kind: {"active": p["active_id"], "serving": p["serving_id"],
                   **({"loaded": rt.mac_id} if kind == "mac" else {}), "switch": p["progress"]}
            for kind, p in sorted(pointers.items())}


def configuration(settings, rt) -> dict:
    """What this deployment runs: base model and tuning, artifacts, updater, default strategy, limits."""
    def name(path):
        return str(path) if path is not None else None
    return {"base_model": settings.base_model, "qa_tuning": name(settings.qa_tuning_path),
            "mac_artifact": name(settings.mac_artifact_path) if rt.mac is not None else None,
            "mac_storage": settings.mac_storage if rt.mac is not None else None,
            "updater": settings.updater_spec, "update_bank": settings.update_bank_config().model_dump(mode="json")
            if rt.update_bank is not None else None, "default_strategy": settings.strategy,
            "serving": {"max_batch_asks": settings.max_batch_asks, "max_waiting_asks": settings.max_waiting_asks,
                        "batch_wait_seconds": settings.batch_wait_seconds, "cpu_bf16": settings.cpu_bf16,
                        "cpu_bf16_flags": list(cpu_bf16_flags()),
                        "cpu_packed_linears": sum(type(m) is PackedLinear for m in rt.model.modules())
                        if rt.model is not None else 0,
                        "bf16_autocast": bool(rt.model is not None
                                              and cpu_bf16_enabled(settings.cpu_bf16, rt.model.device))},
            "limits": settings.limits()}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    """Prometheus text format: queue depth, documents by status, memory-bank size, adapter
    version, ask and ingest latency histograms, HTTP requests."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

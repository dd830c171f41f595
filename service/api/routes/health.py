"""Probes and metrics: /healthz (liveness), /readyz (can serve, and with what), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.migrate import current_revision, head_revision

router = APIRouter(tags=["ops"])


def _ping_database(state) -> str:
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # report any driver error as a failed check, never a 500
        return f"error: {exc.__class__.__name__}: {exc}"


def _ping_redis(state) -> str:
    try:
        state.redis.ping()
        return "ok"
    except Exception as exc:
        return f"error: {exc.__class__.__name__}: {exc}"


@router.get("/healthz", responses={503: {"description": "a dependency does not answer (the failing check is in the body)"}})
def healthz(request: Request) -> JSONResponse:
    """Liveness: the process is up and its database and Redis answer."""
    state = request.app.state
    checks = {"database": _ping_database(state), "redis": _ping_redis(state)}
    healthy = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if healthy else "unavailable", "checks": checks, "base_model": state.settings.base_model}
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/readyz", responses={503: {"description": "not ready: the failing checks say why"}})
def readyz(request: Request) -> JSONResponse:
    """Readiness: model, artifacts, database (schema at head), Redis, worker. 503 with the reasons
    when something is missing. ``strategies`` says what /ask can do right now."""
    state = request.app.state
    settings = state.settings
    checks: dict[str, str] = {}
    checks["model"] = "ok" if getattr(state, "answerer", None) is not None else f"error: {state.model_error}"
    checks["database"] = _ping_database(state)
    if checks["database"] == "ok":
        try:
            current, head = current_revision(state.engine), head_revision()
            checks["schema"] = "ok" if current == head else f"error: at revision {current}, code expects {head}"
        except Exception as exc:
            checks["schema"] = f"error: {exc.__class__.__name__}: {exc}"
    checks["redis"] = _ping_redis(state)
    if settings.mac_artifact is None:
        checks["mac_artifact"] = "not configured: answers use retrieval (and the adapter, if any)"
    else:
        checks["mac_artifact"] = "ok" if state.mac is not None else f"error: {state.mac_error}"
    if settings.updater is None:
        checks["updater"] = "not configured: documents do not update the adapter"
    else:
        checks["updater"] = "ok" if state.updater_error is None else f"error: {state.updater_error}"
    if settings.embedded_worker:
        thread = getattr(state, "worker_thread", None)
        checks["worker"] = "ok" if thread is not None and thread.is_alive() else f"error: {state.worker_error or 'not running'}"
    else:
        checks["worker"] = "external: run freshlm-worker"
    ready = all(v == "ok" or not v.startswith("error") for v in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if checks["model"] == "ok" and checks["database"] == "ok":
        try:
            body["strategies"] = sorted(state.answerer.available())
        except Exception as exc:
            body["strategies"] = []
            checks["strategies"] = f"error: {exc}"
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    """Prometheus text format: queue depth, documents by status, memory-bank size, adapter
    version, ask and ingest latency histograms, HTTP requests."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

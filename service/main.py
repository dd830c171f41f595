"""App factory and lifespan: the runtime (database, Redis, model, artifacts; ``service.runtime``) is
opened once and put on ``app.state`` with the answerer; the ingest worker runs as a thread unless
it runs as its own process."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request

from service import documents
from service.adapters import store
from service.adapters.live import LiveAdapters
from service.answerer import Answerer
from service.api.routes import adapters, ask, health, memory
from service.api.routes import documents as documents_routes
from service.core.config import Settings
from service.core.errors import SafeJSONResponse, ServiceError, error_body, install_error_handlers
from service.core.logging import configure_logging, request_id_var
from service.core.security import check_api_key
from service.metrics import Metrics
from service.runtime import Runtime, open_runtime
from service.worker.pipeline import build_worker, run_worker

log = logging.getLogger("freshlm")


def _state_reader(rt: Runtime):
    def read() -> dict:
        with rt.sessions() as session:
            out = {"queue_depth": documents.queue_depth(session), "documents": documents.status_counts(session),
                   "adapter_version": store.active_version(session)}
        out["memory_bank_entries"] = len(rt.mac.bank) if rt.mac is not None else None
        return out
    return read


def start_worker_thread(rt: Runtime, metrics: Metrics, stop: threading.Event) -> threading.Thread | None:
    """The embedded worker (the zero-configuration default); on failure ``rt.errors["worker"]``."""
    try:
        worker = build_worker(rt)
    except Exception as exc:
        rt.errors["worker"] = f"{exc.__class__.__name__}: {exc}"
        if rt.settings.updater_spec:
            rt.errors["updater"] = rt.errors["worker"]
        log.error("ingest worker not started: %s", rt.errors["worker"])
        return None
    worker.on_ingested = metrics.ingest_seconds.observe
    worker.on_swap = metrics.adapter_swaps.inc
    thread = threading.Thread(target=run_worker, args=(worker, stop), name="ingest-worker", daemon=True)
    thread.start()
    return thread


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    settings: Settings = state.settings
    with open_runtime(settings) as rt:
        state.runtime = rt
        state.metrics.add_state_collector(_state_reader(rt))
        live = LiveAdapters(rt.model, settings.adapters_dir, settings.adapters_loaded)
        state.answerer = Answerer(rt.model, rt.tokenizer, rt.sessions, live, settings.pipeline_config(), rt.mac)
        if rt.mac is not None:  # the embedded worker writes memory with this model: not during an ask
            rt.mac.model_lock = live.lock
        stop = threading.Event()
        state.worker_thread = start_worker_thread(rt, state.metrics, stop) if settings.embedded_worker else None
        log.info("FreshLM ready: database %s, redis %s", rt.engine.url.render_as_string(),
                 settings.redis_url or "embedded")
        try:
            yield
        finally:
            stop.set()
            if state.worker_thread is not None:
                state.worker_thread.join(timeout=60)


def install_middleware(app: FastAPI) -> None:
    access = logging.getLogger("freshlm.access")

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        """Request id (taken from X-Request-ID or made), API-key check, access log, metrics."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request_id = request_id[:64]
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        try:
            try:
                check_api_key(request)
                response = await call_next(request)
            except ServiceError as exc:
                response = SafeJSONResponse(error_body(exc.detail, exc.type), status_code=exc.status_code)
            response.headers["X-Request-ID"] = request_id
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            app.state.metrics.http_requests.labels(request.method, path, str(response.status_code)).inc()
            access.info("%s %s %d", request.method, request.url.path, response.status_code,
                        extra={"method": request.method, "path": request.url.path, "status": response.status_code,
                               "duration_ms": round((time.perf_counter() - start) * 1000, 2)})
            return response
        finally:
            request_id_var.reset(token)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="FreshLM",
        version="0.2.0",
        description=(
            "Keep a deployed language model current with a stream of news documents. POST documents "
            "(durable before the 202), poll their status, ask questions answered from MAC memory, the "
            "live adapter and/or retrieved passages. Errors: `{detail, type, request_id}`."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings()
    app.state.metrics = Metrics()
    install_error_handlers(app)
    install_middleware(app)
    for module in (documents_routes, ask, adapters, memory, health):
        app.include_router(module.router)
    return app


def run() -> None:
    """Console entry point ``freshlm-serve``: serve on FRESHLM_HOST:FRESHLM_PORT."""
    settings = Settings()
    configure_logging(settings.log_json)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                access_log=False)  # freshlm.access logs every request with its id


if __name__ == "__main__":
    run()

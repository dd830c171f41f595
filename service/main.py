"""App factory and lifespan: database (migrated), Redis, model and artifacts are opened once and
put on ``app.state``; the ingest worker runs as a thread unless it runs as its own process."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager

import redis
import uvicorn
from fastapi import FastAPI, Request

from service import adapter_store
from service.answerer import Answerer
from service.base_model import load_base_model
from service.api.routes import adapters, ask, documents, health, memory
from service.core.config import Settings
from service.core.errors import SafeJSONResponse, ServiceError, error_body, install_error_handlers
from service.core.logging import configure_logging, request_id_var
from service.core.security import check_api_key
from service.db import make_engine, session_factory
from service.ingest_queue import queue_depth, status_counts
from service.ingest_worker import build_worker, run_worker
from service.live_adapter import LiveAdapters
from service.mac_memory import load_mac_runtime
from service.metrics import Metrics
from service.migrate import upgrade_database
from service.redis_server import EmbeddedRedis, start_embedded_redis

log = logging.getLogger("freshlm")


def open_redis(settings: Settings) -> tuple[redis.Redis, EmbeddedRedis | None]:
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = start_embedded_redis(settings.data_dir / "redis")
        url = embedded.url
    return redis.Redis.from_url(url, health_check_interval=10, retry_on_timeout=True), embedded


def _state_reader(app: FastAPI):
    def read() -> dict:
        state = app.state
        with state.sessions() as session:
            out = {"queue_depth": queue_depth(session), "documents": status_counts(session),
                   "adapter_version": adapter_store.active_version(session)}
        out["memory_bank_entries"] = len(state.mac.bank) if state.mac is not None else None
        return out
    return read


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    settings: Settings = state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    state.redis, embedded = open_redis(settings)
    state.engine = make_engine(settings.sqlalchemy_url)
    if settings.auto_migrate:
        revision = upgrade_database(state.engine)
        log.info("database schema at revision %s", revision)
    state.sessions = session_factory(state.engine)
    state.metrics.add_state_collector(_state_reader(app))
    state.mac = state.answerer = None
    state.model_error = state.mac_error = state.updater_error = state.worker_error = None
    log.info("loading base model %s", settings.base_model)
    model, tokenizer = load_base_model(settings)
    if settings.mac_artifact is not None:
        try:
            state.mac = load_mac_runtime(settings.mac_artifact, model, tokenizer, state.redis, settings.model_settings(),
                                         settings.mac_top_k, settings.mac_group_size, settings.mac_storage)
        except Exception as exc:  # serve without it; /readyz reports the reason
            state.mac_error = f"{exc.__class__.__name__}: {exc}"
            log.error("MAC artifact %s not loaded: %s", settings.mac_artifact, state.mac_error)
    adapters_ = LiveAdapters(model, settings.adapters_dir, settings.adapters_loaded)
    state.answerer = Answerer(model, tokenizer, state.sessions, adapters_, state.mac, settings.rag_min_score_ratio)
    if state.mac is not None:  # the embedded worker writes memory with this model: not during an ask
        state.mac.model_lock = adapters_.lock
    stop = threading.Event()
    state.worker_thread = None
    if settings.embedded_worker:
        try:
            worker = build_worker(settings, state.sessions, state.redis, model, tokenizer, mac=state.mac)
            worker.on_ingested = state.metrics.ingest_seconds.observe
            worker.on_swap = state.metrics.adapter_swaps.inc
            state.worker_thread = threading.Thread(target=run_worker, args=(worker, stop), name="ingest-worker",
                                                   daemon=True)
            state.worker_thread.start()
        except Exception as exc:
            state.worker_error = f"{exc.__class__.__name__}: {exc}"
            if settings.updater:
                state.updater_error = state.worker_error
            log.error("ingest worker not started: %s", state.worker_error)
    log.info("FreshLM ready: database %s, redis %s", state.engine.url.render_as_string(),
             settings.redis_url or "embedded")
    try:
        yield
    finally:
        stop.set()
        if state.worker_thread is not None:
            state.worker_thread.join(timeout=60)
        state.redis.close()
        state.engine.dispose()
        if embedded is not None:
            embedded.stop()


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
    for module in (documents, ask, adapters, memory, health):
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

"""App factory and lifespan: the runtime (database, Redis, model, artifacts; ``service.runtime``) is
opened once and put on ``app.state`` with the retrieval index and the answerer; the ingest worker
runs as a thread unless it runs as its own process."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from service import documents, tenants
from service.adapters import store
from service.adapters.live import LiveAdapters
from service.answerer import Answerer
from service.artifacts import run_follower
from service.api.middleware import RequestContextMiddleware
from service.api.routes import adapters, artifacts, ask, health, memory, openai_compat
from service.api.routes import documents as documents_routes
from service.api.routes import tenants as tenants_routes
from service.core.allocator import keep_freed_memory
from service.core.config import Settings
from service.core.errors import install_error_handlers
from service.core.logging import configure_logging
from service.corpus_index import CorpusIndex
from service.metrics import Metrics
from service.runtime import Runtime, open_runtime
from service.scheduler import Scheduler
from service.server import server_config
from service.worker.pipeline import build_worker, run_worker
from training import artifact_registry as registry

log = logging.getLogger("freshlm")


def _state_reader(rt: Runtime):
    def read() -> dict:
        with rt.db.read() as session:
            ids = tenants.tenant_ids(session)
            out = {"queue_depth": documents.queue_depth(session), "documents": documents.status_counts(session),
                   "adapter_versions": {t: store.active_version(session, t) for t in ids}}
        out["memory_bank_entries"] = {t: len(rt.mac_for(t).bank) for t in ids} if rt.mac is not None else None
        out["update_bank_entries"] = ({t: len(rt.bank_for(t).bank) for t in ids}
                                      if rt.update_bank is not None else None)
        out["artifacts"] = {kind: {**p, "loaded": rt.mac_id if kind == "mac" else None}
                            for kind, p in registry.pointers(rt.db.engine).items()}
        return out
    return read


def start_worker_thread(rt: Runtime, index: CorpusIndex, metrics: Metrics, stop: threading.Event) -> threading.Thread | None:
    """The embedded worker (the zero-configuration default); on failure ``rt.errors["worker"]``."""
    try:
        worker = build_worker(rt)
    except Exception as exc:
        rt.errors["worker"] = f"{exc.__class__.__name__}: {exc}"
        if rt.settings.updater_spec:
            rt.errors["updater"] = rt.errors["worker"]
        log.error("ingest worker not started: %s", rt.errors["worker"])
        return None
    worker.index = index
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
        state.index = CorpusIndex(rt.db, settings.pipeline_config(), rt.embed)
        state.index.refresh()  # the first answer already finds every ingested document
        scheduler = Scheduler(rt.model, rt.tokenizer, live, settings.scheduler_config(rt.model.device),
                              settings.max_prompt_tokens)
        scheduler.observer = state.metrics.watch_scheduler(scheduler)
        scheduler.start()
        state.scheduler = scheduler
        state.answerer = Answerer(rt.model, rt.tokenizer, rt.db.read, live, settings.pipeline_config(), state.index,
                                  scheduler, rt.mac_for, rt.bank_for)
        rt.mac_lock = live.lock  # the embedded worker writes memory with this model: not during an ask
        if rt.mac is not None:
            rt.mac.model_lock = live.lock
        stop = threading.Event()
        threading.Thread(target=run_follower, args=(rt, stop, settings.artifact_poll_seconds), name="artifact-follower",
                         daemon=True).start()
        threading.Thread(target=state.index.run, args=(stop, settings.index_refresh_seconds), name="index-refresh",
                         daemon=True).start()
        state.worker_thread = (start_worker_thread(rt, state.index, state.metrics, stop)
                               if settings.embedded_worker else None)
        log.info("FreshLM ready: database %s, redis %s", rt.db.engine.url.render_as_string(),
                 "configured" if settings.redis_url else "embedded")
        try:
            yield
        finally:
            stop.set()
            scheduler.stop()
            if state.worker_thread is not None:
                state.worker_thread.join(timeout=60)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="FreshLM",
        version="0.3.0",
        description=(
            "Keep a deployed language model current with a stream of news documents. POST documents "
            "(durable before the 202), poll their status, ask questions answered from MAC memory, the "
            "live adapter and/or retrieved passages. Every API key belongs to a tenant, whose documents, "
            "memory and adapter are its own. Errors: `{detail, type, request_id}`."
        ),
        lifespan=lifespan,
        redirect_slashes=False,  # a redirect would be built from the request's Host header
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    for module in (documents_routes, ask, openai_compat, adapters, artifacts, memory, tenants_routes, health):
        app.include_router(module.router)
    return app


def run() -> None:
    """Console entry point ``freshlm-serve``: serve on FRESHLM_HOST:FRESHLM_PORT."""
    settings = Settings()
    configure_logging(settings.log_json)
    if settings.keep_freed_memory:
        keep_freed_memory()
    try:
        uvicorn.Server(server_config(create_app(settings), settings)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C after its graceful shutdown: that is a clean stop
        pass


if __name__ == "__main__":
    run()

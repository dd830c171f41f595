"""App factory and lifespan: models, database and Redis are opened once and put on ``app.state``."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import redis
import uvicorn
from fastapi import FastAPI

from service.answerer import RagAnswerer
from service.api.routes import ask, documents, health
from service.core.config import Settings
from service.db import init_db, make_engine
from service.memory_bank import RedisMemoryBank
from service.redis_server import start_embedded_redis
from training.models import load_causal_lm

log = logging.getLogger("freshlm")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    redis_url = settings.redis_url
    if redis_url is None:
        embedded = start_embedded_redis(settings.data_dir / "redis")
        redis_url = embedded.url
    app.state.redis = redis.Redis.from_url(redis_url)
    app.state.memory_bank = RedisMemoryBank(app.state.redis, bank=settings.memory_bank_name)
    engine = make_engine(settings.sqlalchemy_url)
    app.state.sessions = init_db(engine)
    log.info("loading base model %s", settings.base_model)
    model, tokenizer = load_causal_lm(settings.base_model, settings.model_settings())
    app.state.answerer = RagAnswerer(model, tokenizer, app.state.sessions, settings.rag_min_score_ratio)
    log.info("FreshLM ready: database %s, redis %s", engine.url.render_as_string(), redis_url)
    try:
        yield
    finally:
        app.state.redis.close()
        engine.dispose()
        if embedded is not None:
            embedded.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="FreshLM",
        version="0.1.0",
        description="Ingest news documents and answer questions about them with a language model.",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings()
    app.include_router(documents.router)
    app.include_router(ask.router)
    app.include_router(health.router)
    return app


def run() -> None:
    """Console entry point ``freshlm-serve``: serve on FRESHLM_HOST:FRESHLM_PORT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    run()

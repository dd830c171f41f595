"""What the API process and the worker both run on, opened once by one context manager: the
database (migrated), Redis (embedded and supervised by default), the base model with its QA-format
tuning, and the MAC runtime over the Redis memory bank (vLLM builds its engine first, then the app
state).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service import documents
from service.core.config import Settings
from service.db import DEFAULT_TENANT, Database, open_database
from service.migrate import upgrade_database
from service.redis_server import EmbeddedRedis, start_embedded_redis, supervise
from training.artifacts import read_manifest
from training.mac.runtime import MacRuntime, bank_name, load_mac_runtime
from training.memory import RedisMemoryBank
from training.models import load_causal_lm
from training.retrievers import Embedder, encoder_embedder, load_embedder
from training.qa_tuning import apply_qa_tuning

log = logging.getLogger("freshlm")


@dataclass
class Runtime:
    settings: Settings
    db: Database
    redis: redis.Redis
    embedded_redis: EmbeddedRedis | None = None
    model: PreTrainedModel | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    mac: MacRuntime | None = None  # over the default tenant's bank; ``mac_for`` gives any tenant's
    embed: Embedder | None = None  # passages and questions -> vectors (retriever dense / hybrid only)
    errors: dict[str, str] = field(default_factory=dict)  # component -> why it is not available
    _tenant_macs: dict[str, MacRuntime] = field(default_factory=dict)

    def mac_for(self, tenant: str) -> MacRuntime | None:
        """The MAC runtime over ``tenant``'s own bank (None without a MAC artifact), one per tenant
        and process, so its in-process key index persists; an entry that is gone is answered from
        the document's text in SQL."""
        if self.mac is None:
            return None
        if tenant not in self._tenant_macs:
            bank = RedisMemoryBank(self.redis, bank=tenant_bank(self.mac.bank.bank, tenant),
                                   storage=self.settings.mac_storage, ttl_seconds=self.settings.mac_entry_ttl_seconds)
            view = self.mac.with_bank(bank)
            view.fallback = self._texts_of(tenant)
            self._tenant_macs[tenant] = view
        return self._tenant_macs[tenant]

    def _texts_of(self, tenant: str):
        def texts(ids: list[str]) -> dict[str, str]:
            with self.db.read() as session:
                return {r.id: r.text for r in documents.ingested(session, tenant, ids)}
        return texts


def tenant_bank(bank: str, tenant: str) -> str:
    """A tenant's memory bank: its own Redis hash tag (``freshlm:{<bank>:<tenant>}:...``). The
    default tenant keeps the artifact's bank, the key layout from before tenants, so a bank written
    then stays valid."""
    return bank if tenant == DEFAULT_TENANT else f"{bank}:{tenant}"


def open_redis(settings: Settings) -> tuple[redis.Redis, EmbeddedRedis | None]:
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = start_embedded_redis(settings.data_dir / "redis")
        url = embedded.url
    return redis.Redis.from_url(url, health_check_interval=10, retry_on_timeout=True), embedded


def load_base_model(settings: Settings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The configured LM with the QA-format tuning merged in (the base every shipped artifact was
    trained on; without it the instruct model answers in whole sentences)."""
    model, tokenizer = load_causal_lm(settings.base_model, settings.model_settings())
    if settings.qa_tuning_path is not None:
        model = apply_qa_tuning(model, settings.qa_tuning_path)
    return model, tokenizer


def load_mac(settings: Settings, rt: Runtime) -> None:
    """The MAC runtime over a Redis bank named after the artifact; on failure the service serves
    without it and ``errors["mac"]`` says why."""
    artifact = settings.mac_artifact_path
    if artifact is None:
        return
    try:
        read_manifest(artifact)  # a clear error before anything reads the directory
        bank = RedisMemoryBank(rt.redis, bank=bank_name(artifact), storage=settings.mac_storage,
                               ttl_seconds=settings.mac_entry_ttl_seconds)
        rt.mac = load_mac_runtime(artifact, rt.model, rt.tokenizer, bank, settings.mac_read_config(),
                                  settings.model_settings())
    except Exception as exc:
        rt.errors["mac"] = f"{exc.__class__.__name__}: {exc}"
        log.error("MAC artifact %s not loaded: %s", artifact, rt.errors["mac"])


def load_retrieval_encoder(settings: Settings, rt: Runtime) -> Embedder | None:
    """The encoder of dense / hybrid retrieval (none for BM25): MAC's key encoder when the MAC
    artifact names the configured one (one copy in RAM), else ``FRESHLM_ENCODER`` loaded once."""
    if settings.retriever == "bm25":
        return None
    if rt.mac is not None and read_manifest(settings.mac_artifact_path).config.get("encoder") == settings.encoder:
        mac = rt.mac.mac
        return encoder_embedder(mac.encoder, mac.encoder_tokenizer, mac.config.key_tokens)
    return load_embedder(settings.encoder, settings.device)


@contextmanager
def open_runtime(settings: Settings, load_model: bool = True) -> Iterator[Runtime]:
    """Open everything (the model only if ``load_model``); close it all on exit."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    client, embedded = open_redis(settings)
    db = open_database(settings.sqlalchemy_url)
    stop = threading.Event()
    try:
        if embedded is not None:  # restarted if it dies; the worker refills the memory bank
            threading.Thread(target=supervise, args=(embedded, stop), name="redis-supervisor", daemon=True).start()
        if settings.auto_migrate:
            log.info("database schema at revision %s", upgrade_database(db.engine))
        rt = Runtime(settings, db, client, embedded)
        if load_model:
            log.info("loading base model %s", settings.base_model)
            rt.model, rt.tokenizer = load_base_model(settings)
            load_mac(settings, rt)
            rt.embed = load_retrieval_encoder(settings, rt)
        yield rt
    finally:
        stop.set()
        client.close()
        db.dispose()
        if embedded is not None:
            embedded.stop()

"""What the API process and the worker both run on, opened once by one context manager: the
database (migrated), Redis (embedded and supervised by default), the base model with its QA-format
tuning, the MAC runtime over the Redis memory bank, and with ``FRESHLM_UPDATE_BANK`` the update
bank (its own private copy of the model, its entries in Redis) (vLLM builds its engine first, then
the app state).

The configured artifacts are registered in the artifact registry at start (the initial versions
of their kinds); the MAC runtime is the registry's *serving* MAC artifact, so an artifact activated
at run time (and switched to by the worker) stays in use across restarts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service import documents
from service.core.config import Settings
from service.db import DEFAULT_TENANT, Database, open_database
from service.migrate import upgrade_database
from service.redis_server import EmbeddedRedis, start_embedded_redis, supervise
from training import artifact_registry as registry
from training.artifacts import SHIPPED_DIR, read_manifest
from training.mac.runtime import MacRuntime, bank_name, load_mac_runtime
from training.memory import RedisMemoryBank
from training.models import load_causal_lm
from training.retrievers import Embedder, encoder_embedder, load_embedder
from training.qa_tuning import apply_qa_tuning
from training.update_bank.runtime import UpdateBankRuntime, build_update_bank

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
    mac_id: str | None = None  # the registry id of the MAC artifact ``mac`` runs
    mac_lock: threading.RLock | None = None  # the model lock every MAC runtime of this process writes under
    update_bank: UpdateBankRuntime | None = None  # over the default tenant's bank; ``bank_for`` gives any tenant's
    errors: dict[str, str] = field(default_factory=dict)  # component -> why it is not available
    registered: dict[str, str] = field(default_factory=dict)  # kind -> id of the configured artifact
    _tenant_macs: dict[str, tuple[MacRuntime, MacRuntime]] = field(default_factory=dict)  # tenant -> (mac, view)
    _tenant_banks: dict[str, UpdateBankRuntime] = field(default_factory=dict)

    def mac_runtime(self, path: str | Path) -> MacRuntime:
        """A MAC runtime for the artifact at ``path``, over its own bank (``bank_name``)."""
        bank = RedisMemoryBank(self.redis, bank=bank_name(Path(path)), storage=self.settings.mac_storage,
                               ttl_seconds=self.settings.mac_entry_ttl_seconds)
        runtime = load_mac_runtime(Path(path), self.model, self.tokenizer, bank, self.settings.mac_read_config(),
                                   self.settings.model_settings())
        if self.mac_lock is not None:
            runtime.model_lock = self.mac_lock
        return runtime

    def use_mac(self, ident: str, runtime: MacRuntime) -> None:
        """Answer (and write new documents) with ``runtime`` from now on: one assignment, so a
        request reads either the old runtime or the new one, never a mix (tenant views of the old
        one are rebuilt on their next use, ``mac_for``)."""
        self.mac, self.mac_id = runtime, ident

    def mac_for(self, tenant: str) -> MacRuntime | None:
        """The MAC runtime over ``tenant``'s own bank (None without a MAC artifact), one per tenant
        and process, so its in-process key index persists; an entry that is gone is answered from
        the document's text in SQL."""
        mac = self.mac  # read once: an artifact switch (use_mac) replaces it
        if mac is None:
            return None
        cached = self._tenant_macs.get(tenant)
        if cached is None or cached[0] is not mac:
            bank = RedisMemoryBank(self.redis, bank=tenant_bank(mac.bank.bank, tenant),
                                   storage=self.settings.mac_storage, ttl_seconds=self.settings.mac_entry_ttl_seconds)
            view = mac.with_bank(bank)
            view.fallback = self._texts_of(tenant)
            cached = self._tenant_macs[tenant] = (mac, view)
        return cached[1]

    def bank_for(self, tenant: str) -> UpdateBankRuntime | None:
        """The update bank over ``tenant``'s own entries (None without ``FRESHLM_UPDATE_BANK``)."""
        bank = self.update_bank
        if bank is None or tenant == DEFAULT_TENANT:
            return bank
        view = self._tenant_banks.get(tenant)
        if view is None:
            view = self._tenant_banks[tenant] = bank.with_bank(
                RedisMemoryBank(self.redis, bank=tenant_bank(bank.bank.bank, tenant), storage=bank.config.storage))
        return view

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


def _source(path: Path) -> str:
    return "shipped" if Path(path).resolve().is_relative_to(SHIPPED_DIR.resolve()) else "configured"


def register_configured(settings: Settings, rt: Runtime) -> None:
    """Register the configured artifacts (idempotent); each becomes the active and serving version
    of its kind if the kind has none yet. On failure ``errors["registry"]`` says why."""
    paths = {"qa-format": settings.qa_tuning_path, "mac": settings.mac_artifact_path}
    if settings.updater_spec not in (None, "uniform"):
        paths["updater"] = Path(settings.updater_spec)
    for kind, path in paths.items():
        if path is None:
            continue
        try:
            rt.registered[kind] = registry.register(rt.db.engine, path, source=_source(path), activate_if_none=True)
        except Exception as exc:
            rt.errors["registry"] = f"{kind} artifact {path}: {exc.__class__.__name__}: {exc}"
            log.error("artifact registry: %s", rt.errors["registry"])


def serving_mac(rt: Runtime) -> tuple[str | None, Path | None]:
    """The registry's serving MAC artifact (id, path); the configured one without a registry."""
    configured = rt.settings.mac_artifact_path
    try:
        current = registry.pointer(rt.db.engine, "mac")
        row = registry.get(rt.db.engine, current["serving_id"]) if current else None
    except Exception as exc:
        log.error("artifact registry not readable (%s): using the configured MAC artifact", exc)
        row = None
    if row is None:
        return rt.registered.get("mac"), configured
    return row["id"], Path(row["path"])


def load_mac(settings: Settings, rt: Runtime) -> None:
    """The MAC runtime of the serving MAC artifact over a Redis bank named after it; on failure the
    service serves without it and ``errors["mac"]`` says why."""
    if settings.mac_artifact_path is None:
        return
    ident, artifact = serving_mac(rt)
    try:
        read_manifest(artifact)  # a clear error before anything reads the directory
        rt.use_mac(ident, rt.mac_runtime(artifact))
    except Exception as exc:
        rt.errors["mac"] = f"{exc.__class__.__name__}: {exc}"
        log.error("MAC artifact %s not loaded: %s", artifact, rt.errors["mac"])


def update_bank_name(settings: Settings) -> str:
    """The bank of an update setting: entries are deltas of one init at one lr and rank, never
    applied with another (a new setting starts an empty bank, which the worker fills from SQL)."""
    spec = settings.updater_spec
    manifest = b"" if spec == "uniform" else (Path(spec) / "manifest.json").read_bytes()
    setting = json.dumps({"update": settings.update_config().model_dump(mode="json"), "lr": settings.adapter_lr,
                          "encoder": settings.encoder}, sort_keys=True).encode()
    return f"updates-{hashlib.sha256(manifest + setting).hexdigest()[:12]}"


def mac_encoder(settings: Settings, rt: Runtime) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """MAC's key encoder when the MAC artifact names the configured ``FRESHLM_ENCODER``: the one
    copy in RAM that retrieval and the update bank key with too."""
    if rt.mac is not None and read_manifest(settings.mac_artifact_path).config.get("encoder") == settings.encoder:
        return rt.mac.mac.encoder, rt.mac.mac.encoder_tokenizer
    return None


def load_update_bank(settings: Settings, rt: Runtime) -> None:
    """The update bank (``FRESHLM_UPDATE_BANK``) on a private copy of the model, keyed by MAC's
    encoder when it is the configured one; on failure ``errors["update_bank"]``."""
    if not settings.update_bank:
        return
    try:
        encoder = mac_encoder(settings, rt)
        config = settings.update_bank_config()
        bank = RedisMemoryBank(rt.redis, bank=update_bank_name(settings), storage=config.storage)
        rt.update_bank = build_update_bank(copy.deepcopy(rt.model), rt.tokenizer, settings.update_config(), bank,
                                           config, settings.updater_spec, lr=settings.adapter_lr, encoder=encoder)
    except Exception as exc:
        rt.errors["update_bank"] = f"{exc.__class__.__name__}: {exc}"
        log.error("update bank not loaded: %s", rt.errors["update_bank"])


def load_retrieval_encoder(settings: Settings, rt: Runtime) -> Embedder | None:
    """The encoder of dense / hybrid retrieval (none for BM25): MAC's key encoder when the MAC
    artifact names the configured one (``mac_encoder``), else ``FRESHLM_ENCODER`` loaded once."""
    if settings.retriever == "bm25":
        return None
    shared = mac_encoder(settings, rt)
    if shared is not None:
        return encoder_embedder(*shared, rt.mac.mac.config.key_tokens)
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
        register_configured(settings, rt)
        if load_model:
            log.info("loading base model %s", settings.base_model)
            rt.model, rt.tokenizer = load_base_model(settings)
            load_mac(settings, rt)
            load_update_bank(settings, rt)
            rt.embed = load_retrieval_encoder(settings, rt)
        yield rt
    finally:
        stop.set()
        client.close()
        db.dispose()
        if embedded is not None:
            embedded.stop()

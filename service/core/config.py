"""Service settings, read from ``FRESHLM_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

import socket
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.memory import Storage
from training.models import DEFAULT_BASE_MODEL, DEFAULT_ENCODER, ModelSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRESHLM_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="SQLite file, embedded Redis, adapter versions")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir")
    redis_url: str | None = Field(None, description="Redis URL; default: an embedded redis-server")
    memory_bank_name: str = Field("default", description="bank name when no MAC artifact names it")
    auto_migrate: bool = Field(True, description="run Alembic migrations to head on start")

    base_model: str = DEFAULT_BASE_MODEL
    encoder: str = DEFAULT_ENCODER
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = Field(None, description="converted-model cache (default ~/.cache/freshlm)")

    qa_tuning: Path | None = Field(
        None, description="qa_lora artifact merged into the base model at start (short-span answers; the base "
                          "the MAC / CaMeLS artifacts were trained on), e.g. artifacts/qa-format/smollm2-135m-instruct")

    # artifacts (none configured: the service answers with retrieval and says so in /readyz)
    mac_artifact: Path | None = Field(None, description="MAC artifact directory (memory tokens per document)")
    mac_top_k: int | None = Field(1, ge=1, description="memory entries each question reads, by key similarity (None: all)")
    mac_group_size: int = Field(16, ge=1, description="memory entries read from Redis at a time")
    mac_storage: Storage = Field(
        "float16", description="how new memory entries are stored in Redis: int8 (one scale per 64-value slot "
                               "vector) takes ~52 % of the fp16 bytes for ~1 F1 point (docs/mac.md)")
    updater: str | None = Field(
        None, description="adapter updates per document: a CaMeLS weighting-model artifact path, or 'uniform'"
    )
    adapter_rank: int = Field(4, ge=1, description="LoRA rank of the live adapter")
    adapter_lr: float = Field(5e-4, gt=0, description="SGD learning rate of the single-step update")
    adapter_max_tokens: int = Field(256, ge=8, description="document tokens one update reads")
    adapter_max_drift: float = Field(0.5, gt=0, description="guard: max KL(old || new) on the locality probe")
    adapters_loaded: int = Field(4, ge=1, description="adapter versions kept loaded for answering")
    adapter_keep_versions: int = Field(
        50, ge=2, description="adapter versions whose weights stay on disk (the newest, plus the active and "
                              "the initial one): the rollback window; older weights are deleted, their lineage stays")

    # ingest
    embedded_worker: bool = Field(True, description="run the ingest worker as a thread of the API process")
    worker_id: str = Field(default_factory=socket.gethostname, description="lease owner name of this worker")
    worker_batch: int = Field(8, ge=1, description="documents claimed at a time")
    worker_lease_seconds: float = Field(300, gt=0, description="a claim older than this is taken over")
    worker_poll_seconds: float = Field(0.2, gt=0)
    max_attempts: int = Field(3, ge=1, description="failed ingest attempts before a document is 'failed'")

    # request limits
    max_batch_documents: int = Field(64, ge=1)
    max_document_chars: int = Field(100_000, ge=1)
    max_question_chars: int = Field(2_000, ge=1)
    rag_top_k: int = Field(3, ge=1, le=20)
    rag_min_score_ratio: float = Field(0.5, ge=0.0, le=1.0, description="drop passages scoring below this fraction of the best")
    max_new_tokens: int = Field(32, ge=1, le=512)

    # security and serving
    api_keys: list[str] = Field(default_factory=list, description="if set, every API call needs one of these keys")
    admin_api_keys: list[str] = Field(default_factory=list, description="keys for delete / rollback / rebuild")
    log_json: bool = Field(True, description="one JSON object per log line")
    host: str = "127.0.0.1"
    port: int = 8000

    @cached_property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'freshlm.db').resolve()}"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    def model_settings(self) -> ModelSettings:
        extra = {"cache_dir": self.cache_dir} if self.cache_dir else {}
        return ModelSettings(
            base_model=self.base_model, encoder=self.encoder, device=self.device, dtype=self.dtype, **extra
        )

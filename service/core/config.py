"""Service settings, read from ``FRESHLM_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.models import DEFAULT_BASE_MODEL, DEFAULT_ENCODER, ModelSettings


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRESHLM_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="SQLite file, embedded Redis, adapters")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir")
    redis_url: str | None = Field(None, description="Redis URL; default: an embedded redis-server")
    memory_bank_name: str = "default"

    base_model: str = DEFAULT_BASE_MODEL
    encoder: str = DEFAULT_ENCODER
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = Field(None, description="converted-model cache (default ~/.cache/freshlm)")

    max_batch_documents: int = Field(64, ge=1)
    max_document_chars: int = Field(100_000, ge=1)
    max_question_chars: int = Field(2_000, ge=1)
    rag_top_k: int = Field(3, ge=1, le=20)
    rag_min_score_ratio: float = Field(0.5, ge=0.0, le=1.0, description="drop passages scoring below this fraction of the best")
    max_new_tokens: int = Field(32, ge=1, le=512)

    host: str = "127.0.0.1"
    port: int = 8000

    @cached_property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'freshlm.db').resolve()}"

    def model_settings(self) -> ModelSettings:
        extra = {"cache_dir": self.cache_dir} if self.cache_dir else {}
        return ModelSettings(
            base_model=self.base_model, encoder=self.encoder, device=self.device, dtype=self.dtype, **extra
        )

"""Service settings, read from ``FRESHLM_*`` environment variables (or a ``.env`` file).

Answering, memory and update defaults are the training package's own config defaults
(``PipelineConfig``, ``MacReadConfig``, ``UpdateConfig``): the values the harness chose on the
validation streams, so the service runs what docs/BENCHMARKS.md measures.
"""

from __future__ import annotations

import socket
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.scheduler import SchedulerConfig
from training.artifacts import shipped_artifact
from training.mac.amortizer import SlotScores
from training.mac.runtime import MacReadConfig
from training.memory import Storage
from training.models import DEFAULT_BASE_MODEL, DEFAULT_ENCODER, ModelSettings
from training.pipeline import PipelineConfig
from training.prefix_cache import PrefixCacheConfig
from training.precision import cpu_bf16_enabled
from training.retrievers import RetrieverKind
from training.update_bank.runtime import UpdateBankConfig
from training.updates import UpdateConfig

_PIPELINE, _MAC, _UPDATE, _BANK = PipelineConfig(), MacReadConfig(), UpdateConfig(), UpdateBankConfig()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRESHLM_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="SQLite file, embedded Redis, adapter versions")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in data_dir")
    redis_url: str | None = Field(None, description="Redis URL; default: an embedded redis-server")
    auto_migrate: bool = Field(True, description="run Alembic migrations to head on start")

    base_model: str = DEFAULT_BASE_MODEL
    encoder: str = DEFAULT_ENCODER
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = Field(None, description="converted-model cache (default ~/.cache/freshlm)")

    # artifacts: "auto" = the one that ships for the built-in base model (artifacts/), "none" = off
    qa_tuning: str = Field("auto", description="qa_lora artifact merged into the base model at start (short-span "
                                                "answers; the base every shipped artifact was trained on), auto or none")
    mac_artifact: str = Field("auto", description="MAC artifact directory (memory entries per document), auto or none")
    updater: str | None = Field(
        None, description="adapter updates per document: 'uniform', a CaMeLS weighting-model artifact or a "
                          "meta-trained init artifact (none: documents do not update the adapter)")

    artifact_poll_seconds: float = Field(2.0, gt=0, description="how often an API process reads the artifact "
                                                                "registry's serving pointer (live pickup)")

    # answering (training.pipeline.PipelineConfig)
    strategy: str = Field(_PIPELINE.strategy, description="components `auto` uses (those deployed), e.g. mac+rag")
    retriever: RetrieverKind = Field(_PIPELINE.retriever, description="how passages are found: bm25, dense "
                                                                      "(the encoder's cosine) or hybrid (both, RRF)")
    rag_top_k: int = Field(_PIPELINE.rag_top_k, ge=1, le=20)
    rag_min_score_ratio: float = Field(_PIPELINE.rag_min_score_ratio, ge=0.0, le=1.0,
                                       description="drop passages scoring below this fraction of the best")
    rag_passage_words: int = Field(_PIPELINE.rag_passage_words, ge=10)
    rag_passage_chars: int = Field(_PIPELINE.rag_passage_chars, ge=100,
                                   description="characters per retrieved passage (a text without spaces is cut)")
    max_prompt_tokens: int = Field(_PIPELINE.max_prompt_tokens, ge=64,
                                   description="prompt tokens at most: passages are cut to fit (and to the model's "
                                               "context less the answer)")
    max_new_tokens: int = Field(24, ge=1, le=512, description="answer tokens when a question does not say")
    max_batch_asks: int = Field(8, ge=1, description="questions decoded together in one batch (1: batching off)")
    max_waiting_asks: int = Field(64, ge=1, description="questions waiting for the model; more get 503 + Retry-After")
    batch_wait_seconds: float = Field(0.1, ge=0, le=1, description="how long a batch waits to gather as many "
                                                                    "questions as the last batch answered plus those "
                                                                    "that waited for it (a lone asker never waits)")
    prefix_cache_mb: float = Field(256.0, ge=0, description="RAM for prompt key/values reused by later prompts that "
                                                             "start alike (system prompt, same passages; per tenant "
                                                             "and adapter version; 0: off)")
    cpu_bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 autocast for generation on a CPU: auto = only where the CPU "
                            "has AMX (amx_bf16; avx512_bf16 alone measured slower than fp32), on = always, off = never")
    cpu_packed_linears: bool = Field(True, description="fp32 linear layers on a CPU through oneDNN with weights packed "
                                                       "once (training.packed_linear): an 8-question decoding step "
                                                       "costs ~1.3x a 1-question step instead of ~2x; the model's "
                                                       "weights take their size again in RAM")
    index_refresh_seconds: float = Field(1.0, gt=0, description="how often the retrieval index catches up with "
                                                                "documents another process ingested or deleted")

    # memory (training.mac.runtime.MacReadConfig)
    mac_top_k: int | None = Field(_MAC.top_k, ge=1, description="memory entries each question reads, by key similarity")
    mac_group_size: int = Field(_MAC.group_size, ge=1, description="memory entries read from Redis at a time")
    mac_entry_ttl_seconds: int | None = Field(
        None, ge=1, description="TTL of each memory entry in Redis, refreshed when read (none: no TTL); with "
                                "maxmemory-policy volatile-lru, Redis evicts the least recently read entries when full, "
                                "and an evicted entry is answered from its text and rebuilt from SQL")
    mac_rerotate: bool = Field(_MAC.rerotate, description="each memory entry read gets its own positions (its keys "
                                                          "re-rotated; RoPE base models)")
    mac_storage: Storage = Field(_MAC.storage, description="how new memory entries are stored in Redis: KIVI int4 (the "
                                                                   "default: 32 % of fp16's bytes), float16, int8, or "
                                                                   "KIVI int2 / k4v2 / k3v2 (docs/mac.md)")
    mac_doc_slots: int | None = Field(_MAC.doc_slots, ge=1, description="document slots a new memory entry keeps per "
                                                                        "256-token chunk (none: the artifact's own)")
    mac_combine: Literal["joint", "separate"] = Field(
        _MAC.combine, description="how a question reads its FRESHLM_MAC_TOP_K entries: joint (side by side, one "
                                  "answer) or separate (each alone, one candidate per entry decoded in one batch; the "
                                  "most confident, weighted by key similarity, wins; a stream gets its tokens at once, "
                                  "when it is chosen)")
    mac_slot_scores: SlotScores = Field(_MAC.slot_scores, description="how a new memory entry's document slots are "
                                                                      "chosen: h2o (heavy hitters) or kvzip (context "
                                                                      "reconstruction, one more forward pass)")

    # adapter updates (training.updates.UpdateConfig; a meta-trained init brings its own rank, optimizer and lr)
    adapter_optimizer: Literal["adam", "sgd"] = _UPDATE.optimizer
    adapter_lr: float | None = Field(None, gt=0, description=f"step size (none: {_UPDATE.lr}, or a meta-trained init's own)")
    adapter_rank: int = Field(_UPDATE.lora.rank, ge=1, description="LoRA rank of the live adapter")
    adapter_max_tokens: int = Field(_UPDATE.max_tokens, ge=8, description="document tokens one update reads")
    adapter_max_drift: float | None = Field(_UPDATE.max_drift, gt=0,
                                            description="guard: max KL(old || new) on the locality probe (none: no bound)")
    update_bank: bool = Field(False, description="keep each document's single update as its own entry in a Redis bank "
                                                 "(the update bank) and apply a question's entries for that request, "
                                                 "instead of accumulating the updates in a versioned live adapter; "
                                                 "deleting a document deletes its update exactly. Needs FRESHLM_UPDATER")
    update_bank_top_k: int = Field(_BANK.top_k, ge=1, le=4, description="update-bank entries a question applies "
                                                                         "(their deltas add up)")
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

    # request limits: bounded work per request
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="request body size (checked before it is parsed)")
    max_batch_documents: int = Field(64, ge=1, description="documents per POST (checked before they are validated)")
    max_document_chars: int = Field(100_000, ge=1)
    max_question_chars: int = Field(2_000, ge=1)
    max_question_tokens: int = Field(256, ge=1, description="question length in the model's tokens")
    max_top_k: int = Field(10, ge=1, le=20, description="largest top_k a question may ask for")
    max_answer_tokens: int = Field(32, ge=1, le=512, description="largest max_new_tokens a question may ask for")
    ask_deadline_seconds: float = Field(60.0, gt=0, description="an answer not done by then ends: 503 if it waited "
                                                                "for the model, 504 if decoding ran into it")

    # security and serving
    api_keys: list[str] = Field(default_factory=list, description="user keys of the default tenant (bootstrap)")
    admin_api_keys: list[str] = Field(default_factory=list, description="admin keys of the default tenant: delete / "
                                                                        "rollback / rebuild, and manage tenants")
    log_json: bool = Field(True, description="one JSON object per log line")
    keep_freed_memory: bool = Field(True, description="glibc malloc keeps freed memory for the next decoding step "
                                                      "(service.core.allocator): faster from the first request, RSS "
                                                      "keeps its high-water mark")
    host: str = "127.0.0.1"
    port: int = 8000
    header_timeout_seconds: float = Field(10.0, gt=0, description="a request's headers must arrive within this "
                                                                  "(slow-header clients get 408 and are dropped)")
    keep_alive_seconds: int = Field(
        75, ge=1, description="an idle keep-alive connection is closed after this; longer than clients' and proxies' "
                              "own idle limits (httpx 5 s, nginx upstream 60 s), so that they close first: a request sent "
                              "on a connection the server is closing at that moment is reset")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line + headers (larger: 431)")

    @field_validator("data_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Resolved at start: child processes (the embedded redis-server changes into its --dir) and
        later working-directory changes see the same place."""
        return value.expanduser().resolve() if value is not None else None

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        return PipelineConfig(strategy=value).strategy

    @model_validator(mode="after")
    def _bank_needs_updater(self) -> "Settings":
        if self.update_bank and self.updater in (None, "none"):
            raise ValueError("FRESHLM_UPDATE_BANK needs FRESHLM_UPDATER (uniform, a CaMeLS weighting model or a "
                             "meta-trained init): the bank keeps that updater's step per document")
        return self

    def _artifact(self, value: str | None, kind: str) -> Path | None:
        if value is None or value == "none":
            return None
        if value == "auto":
            return shipped_artifact(kind, self.base_model)
        return Path(value).expanduser().resolve()

    @cached_property
    def qa_tuning_path(self) -> Path | None:
        return self._artifact(self.qa_tuning, "qa-format")

    @cached_property
    def mac_artifact_path(self) -> Path | None:
        return self._artifact(self.mac_artifact, "mac")

    @cached_property
    def updater_spec(self) -> str | None:
        """``uniform``, an artifact path, or None (no updates)."""
        if self.updater in (None, "none"):
            return None
        return "uniform" if self.updater == "uniform" else str(Path(self.updater).expanduser().resolve())

    @cached_property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'freshlm.db'}"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    def model_settings(self) -> ModelSettings:
        extra = {"cache_dir": self.cache_dir} if self.cache_dir else {}
        return ModelSettings(
            base_model=self.base_model, encoder=self.encoder, device=self.device, dtype=self.dtype,
            cpu_packed_linears=self.cpu_packed_linears, **extra
        )

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(strategy=self.strategy, retriever=self.retriever, rag_top_k=self.rag_top_k,
                              rag_min_score_ratio=self.rag_min_score_ratio, rag_passage_words=self.rag_passage_words,
                              rag_passage_chars=self.rag_passage_chars, max_prompt_tokens=self.max_prompt_tokens)

    def limits(self) -> dict[str, float]:
        """The per-request limits (``/readyz`` shows them to admins)."""
        names = ("max_body_bytes", "max_batch_documents", "max_document_chars", "max_question_chars",
                 "max_question_tokens", "max_top_k", "max_answer_tokens", "max_prompt_tokens", "rag_passage_chars",
                 "max_batch_asks", "max_waiting_asks",
                 "ask_deadline_seconds", "header_timeout_seconds", "keep_alive_seconds", "max_header_bytes")
        return {name: getattr(self, name) for name in names}

    def scheduler_config(self, device) -> SchedulerConfig:
        return SchedulerConfig(max_batch=self.max_batch_asks, max_waiting=self.max_waiting_asks,
                               batch_wait_seconds=self.batch_wait_seconds, bf16=cpu_bf16_enabled(self.cpu_bf16, device),
                               prefix_cache=PrefixCacheConfig(max_mb=self.prefix_cache_mb))

    def mac_read_config(self) -> MacReadConfig:
        return MacReadConfig(top_k=self.mac_top_k, group_size=self.mac_group_size, storage=self.mac_storage,
                             rerotate=self.mac_rerotate, doc_slots=self.mac_doc_slots,
                             slot_scores=self.mac_slot_scores, combine=self.mac_combine)

    def update_bank_config(self) -> UpdateBankConfig:
        """The harness's bank defaults (dense MiniLM keys, int8 entries) with this encoder and top-k;
        one per-request adapter slot per question a batch decodes."""
        return UpdateBankConfig(updater=self.updater_spec, encoder=self.encoder, top_k=self.update_bank_top_k,
                                slots=max(self.max_batch_asks, 1))

    def update_config(self) -> UpdateConfig:
        return UpdateConfig(optimizer=self.adapter_optimizer, lr=self.adapter_lr or _UPDATE.lr,
                            lora=_UPDATE.lora.model_copy(update={"rank": self.adapter_rank, "alpha": None}),
                            max_tokens=self.adapter_max_tokens, max_drift=self.adapter_max_drift)

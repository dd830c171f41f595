"""The one interface every evaluated method implements, and what a method is built from.

A method sees the stream one document at a time (``ingest``), then answers questions
(``answer``, batched; ``choice_scores`` for multiple choice). ``stored_bytes`` is what it keeps
beyond the frozen base model (texts, adapters, memory entries); ``close`` gives the base model back
unchanged, so the next method starts from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.mac.runtime import MacReadConfig
from training.models import DEFAULT_BASE_MODEL, DEFAULT_ENCODER
from training.pipeline import PipelineConfig
from training.update_bank.runtime import UpdateBankConfig
from training.updates import UpdateConfig
from training.types import Document, Question


_UPDATE = UpdateConfig()


class MethodConfig(BaseModel):
    """Settings shared by the built-in methods (later methods add their own fields freely)."""

    base_model: str = DEFAULT_BASE_MODEL  # its name picks the shipped artifacts when none is given
    max_new_tokens: int = 24
    batch_size: int = 16
    max_passage_words: int = 400  # gold documents in the oracle prompt are cut to this
    rag_k: int = 3
    rag_passage_words: int = 120
    encoder: str = DEFAULT_ENCODER  # sentence encoder of rag_dense / rag_hybrid (a built-in name or a path)
    # the online update (training.updates.UpdateConfig; defaults: the service's)
    ft_lr: float = _UPDATE.lr
    ft_steps_per_doc: int = _UPDATE.steps_per_document
    ft_lora_r: int = _UPDATE.lora.rank
    ft_lora_alpha: float = 2 * _UPDATE.lora.rank
    ft_lora_top_layers: int | None = _UPDATE.lora.top_layers  # None: every layer
    ft_max_tokens: int = _UPDATE.max_tokens
    ft_max_drift: float | None = _UPDATE.max_drift  # guard: largest KL drift on the locality probe
    updater: str = "uniform"  # the pipeline's adapter updates: uniform, or a CaMeLS / meta-trained init artifact
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)  # the service's answering defaults
    ner_backend: str = "auto"  # auto | spacy | heuristic
    mac_artifact: str | None = None  # MAC artifact directory (mac, mac_rag)
    mac: MacReadConfig = Field(default_factory=MacReadConfig)  # how questions read MAC memory (the service's defaults)
    mac_write_cache: str | None = None  # mac_read: directory keeping written entries across runs
    camels_artifact: str | None = None  # CaMeLS weighting model directory (camels_ft)
    meta_ft_artifact: str | None = None  # meta-trained init directory (meta_ft, meta_ft_4, meta_ft_16)
    meta_ft_docs_per_step: int = 1  # meta_ft: documents pooled into one SGD step
    meta_ft_lr: float | None = None  # meta_ft, update_bank: lr (none: the lr the init was meta-trained for)
    update_bank: UpdateBankConfig = Field(default_factory=UpdateBankConfig)  # update_bank: entries, keys, slots


@dataclass
class MethodContext:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: MethodConfig


@runtime_checkable
class Method(Protocol):
    name: str

    def ingest(self, document: Document) -> None: ...

    def answer(self, questions: list[Question]) -> list[str]: ...

    def choice_scores(self, question: Question) -> list[float]: ...

    def stored_bytes(self) -> int: ...

    def close(self) -> None: ...

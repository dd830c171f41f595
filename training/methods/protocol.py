"""The one interface every evaluated method implements, and what a method is built from.

A method sees the stream one document at a time (``ingest``), then answers questions
(``answer``, batched; ``choice_scores`` for multiple choice). ``stored_bytes`` is what it keeps
beyond the frozen base model (texts, adapters, memory entries); ``close`` gives the base model back
unchanged, so the next method starts from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.memory import Storage
from training.types import Document, Question


class MethodConfig(BaseModel):
    """Settings shared by the built-in methods (later methods add their own fields freely)."""

    max_new_tokens: int = 24
    batch_size: int = 16
    max_passage_words: int = 400  # gold documents in the oracle prompt are cut to this
    rag_k: int = 3
    rag_passage_words: int = 120
    ft_lr: float = 5e-4
    ft_steps_per_doc: int = 1
    ft_lora_r: int = 16
    ft_lora_alpha: int = 32
    ft_lora_top_layers: int | None = None  # None: every layer
    ft_max_tokens: int = 512
    ft_max_drift: float | None = None  # guard of the online update (training.updates.UpdateConfig.max_drift)
    ner_backend: str = "auto"  # auto | spacy | heuristic
    mac_artifact: str | None = None  # MAC artifact directory (mac, mac_rag)
    mac_top_k: int | None = 1  # MAC: entries each question reads, by key similarity (None: all); 1 is best on val
    mac_group_size: int | None = 64  # MAC: memory entries read from the bank at a time (None: all)
    mac_storage: Storage = "float16"  # MAC: how the bank stores entries: float16 or int8 (training.memory)
    camels_artifact: str | None = None  # CaMeLS weighting model directory (camels_ft)
    meta_ft_artifact: str | None = None  # meta-trained init directory (meta_ft, meta_ft_4, meta_ft_16)
    meta_ft_docs_per_step: int = 1  # meta_ft: documents pooled into one SGD step
    meta_ft_lr: float | None = None  # meta_ft: SGD lr (none: the lr the init was meta-trained for)


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

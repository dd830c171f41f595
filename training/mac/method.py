"""``mac`` and ``mac_rag`` as evaluation-harness methods.

Ingesting a document is one forward pass of the base model with the amortizer's memory tokens; its
memory entry (and retrieval key) goes into a ``MemoryBank`` (the in-process one here; the service
writes the same entries to Redis). Answering encodes the question, pre-selects the top-k entries
by key similarity (all of them without ``top_k``), streams them out of the bank ``group_size`` at
a time, and generates after them.
``mac_rag`` also puts the top BM25 passages in the prompt. Deleting a document is ``bank.delete``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.artifacts import config_hash
from training.mac.aggregator import entry_ids, iter_bank_entries, stack_memories
from training.mac.model import (
    MAC, answer_nll, load_mac, prompt_head, prompt_ids, qa_batch, stop_token_ids, strip_head,
)
from training.mac.prefix import PrefixKV, PromptHead, greedy_generate
from training.memory import InMemoryMemoryBank, MemoryBank, Storage
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.prompts import extract_answer
from training.retrieval import BM25Index
from training.types import Document, Question


class MACMethodSettings(BaseModel):
    """Where the MAC artifact is and how the memory is read (from ``MethodConfig``'s ``mac_*``
    fields; the artifact path falls back to ``$FRESHLM_MAC_ARTIFACT``, then ``var/artifacts/mac``)."""

    artifact: Path = Field(Path("var/artifacts/mac"), description="MAC artifact directory")
    top_k: int | None = Field(None, description="entries pre-selected by key similarity (None: all)")
    group_size: int | None = Field(64, description="entries read from the bank at a time")
    storage: Storage = Field("float16", description="how the bank stores entries (float16 or int8)")

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "MACMethodSettings":
        artifact = ctx.config.mac_artifact or os.environ.get("FRESHLM_MAC_ARTIFACT")
        return cls(top_k=ctx.config.mac_top_k, group_size=ctx.config.mac_group_size, storage=ctx.config.mac_storage,
                   **({"artifact": artifact} if artifact else {}))


_LOADED: dict[tuple[str, str, str], MAC] = {}


def cached_mac(path: Path, base: PreTrainedModel) -> MAC:
    """Load an artifact once per process and base model (the harness builds a method per run)."""
    key = (str(Path(path).expanduser().resolve()), config_hash(base.config), str(base.device))
    if key not in _LOADED:
        mac, _ = load_mac(key[0], base.config)
        _LOADED[key] = mac.to(base.device).eval()
    return _LOADED[key]


class MACMethod:
    name = "mac"

    def __init__(
        self,
        ctx: MethodContext,
        mac: MAC,
        settings: MACMethodSettings,
        bank: MemoryBank | None = None,
        rag: bool = False,
    ) -> None:
        self.ctx, self.mac, self.settings = ctx, mac, settings
        self.bank = bank if bank is not None else InMemoryMemoryBank(settings.storage)
        self.rag = rag
        self.documents: dict[str, Document] = {}
        self._index: BM25Index | None = None
        self.head: PromptHead | None = prompt_head(ctx.model, ctx.tokenizer)
        if rag:
            self.name = "mac_rag"

    @property
    def model(self) -> PreTrainedModel:
        return self.ctx.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.ctx.tokenizer

    @torch.no_grad()
    def ingest(self, document: Document) -> None:
        (memory, key), = self.mac.memorize(self.model, self.tokenizer, self.head, [document.text])
        self.bank.put(document.id, memory, key)
        if self.rag:
            self.documents[document.id] = document
            self._index = None

    def delete(self, doc_id: str) -> bool:
        """Forget a document exactly: its entry (and passages) are gone."""
        self.documents.pop(doc_id, None)
        self._index = None
        return self.bank.delete(doc_id)

    def _passages(self, question: Question) -> list[str] | None:
        if not self.rag or not self.documents:
            return None
        if self._index is None:
            self._index = BM25Index(list(self.documents.values()), self.ctx.config.rag_passage_words)
        return [p.text for p in self._index.search(question.question, self.ctx.config.rag_k)] or None

    @torch.no_grad()
    def memory(self, questions: list[Question]) -> tuple[PrefixKV | None, torch.Tensor | None]:
        """Each question's entries (top-k or all), side by side, with the slot mask."""
        keys = self.mac.keys([q.question for q in questions])
        top_k = self.settings.top_k
        bank_keys = self.bank.keys() if top_k else None
        per_question = [list(iter_bank_entries(self.bank, entry_ids(self.bank, key, top_k, bank_keys),
                                               chunk=self.settings.group_size or 64)) for key in keys]
        return stack_memories(per_question, self.model.device)

    @torch.no_grad()
    def answer(self, questions: list[Question]) -> list[str]:
        answers: list[str] = []
        size = self.ctx.config.batch_size
        for start in range(0, len(questions), size):
            batch = questions[start : start + size]
            prompts = [strip_head(prompt_ids(self.tokenizer, q.question, self._passages(q)), self.head)
                       for q in batch]
            memory, mask = self.memory(batch)
            outputs = greedy_generate(self.model, prompts, memory, pad_id=self.tokenizer.pad_token_id,
                                      stop_ids=stop_token_ids(self.tokenizer), max_new_tokens=self.ctx.config.max_new_tokens,
                                      head=self.head, memory_mask=mask, start=self.mac.start(self.head))
            answers += [extract_answer(self.tokenizer.decode(o, skip_special_tokens=True)) for o in outputs]
        return answers

    @torch.no_grad()
    def choice_scores(self, question: Question) -> list[float]:
        """Mean per-token log-probability of each choice (as ``choice_logprobs``) under the prefix."""
        choices = list(question.choices or ())
        memory, mask = self.memory([question])
        if memory is not None:
            memory = [(k.expand(len(choices), -1, -1, -1), v.expand(len(choices), -1, -1, -1)) for k, v in memory]
            mask = mask.expand(len(choices), -1)
        passages = self._passages(question)
        ids, tokens_mask, labels = qa_batch(self.tokenizer, [question.question] * len(choices), choices,
                                     [passages] * len(choices), device=self.model.device, head=self.head)
        return (-answer_nll(self.model, memory, ids, tokens_mask, labels, head=self.head, memory_mask=mask,
                            start=self.mac.start(self.head))).tolist()

    def stored_bytes(self) -> int:
        return sum(self.bank.nbytes(i) for i in self.bank.ids())

    def close(self) -> None:
        self.bank.clear()
        self.documents.clear()
        self._index = None


@register_method("mac")
def build_mac(ctx: MethodContext) -> MACMethod:
    settings = MACMethodSettings.from_context(ctx)
    return MACMethod(ctx, cached_mac(settings.artifact, ctx.model), settings)


@register_method("mac_rag")
def build_mac_rag(ctx: MethodContext) -> MACMethod:
    settings = MACMethodSettings.from_context(ctx)
    return MACMethod(ctx, cached_mac(settings.artifact, ctx.model), settings, rag=True)

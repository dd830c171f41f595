"""MAC in the service: the loaded artifact, its Redis memory bank, ingest and answer helpers.

The bank is named after the artifact's manifest, so memory written by one MAC artifact is never
read with another (a new artifact starts an empty bank, filled by the rebuild).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.memory import RedisMemoryBank
from training.mac.aggregator import entry_ids, iter_bank_entries
from training.mac.model import MAC, answer_questions, load_mac, prompt_head
from training.mac.prefix import PromptHead
from training.memory import Storage
from training.models import ModelSettings


@dataclass
class MacRuntime:
    """``base`` writes the memory (the amortizer runs it over each document); answers may come
    from another instance of the same base model. ``model_lock`` is held while writing: when the
    API's model is shared with an embedded worker, it is the lock asks hold, so a write never runs
    under an ask's per-request adapter hooks."""

    mac: MAC
    bank: RedisMemoryBank
    artifact: Path
    top_k: int | None
    group_size: int
    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    head: PromptHead | None = field(init=False)
    model_lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.head = prompt_head(self.base, self.tokenizer)

    @torch.no_grad()
    def memorize(self, doc_ids: list[str], texts: list[str]) -> None:
        """One base-model forward pass per document chunk; each entry replaces any earlier one (idempotent)."""
        with self.model_lock:
            entries = self.mac.memorize(self.base, self.tokenizer, self.head, texts)
        for doc_id, (memory, key) in zip(doc_ids, entries):
            self.bank.put(doc_id, memory, key)

    @torch.no_grad()
    def answer(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
        passages: list[str] | None, max_new_tokens: int, head: PromptHead | None = None,
    ) -> tuple[str, list[str]]:
        """Answer after the question's memory entries; returns the answer and the memory ids read.
        Without a cached ``head`` (an adapter is active) it is computed now, by the model as it is:
        entries were written after the head, so the head must come first."""
        used: list[str] = []

        def entries_for(_i: int, key: torch.Tensor):
            used.extend(entry_ids(self.bank, key, self.top_k))
            return iter_bank_entries(self.bank, used, chunk=self.group_size, device=self.mac.device)

        (text,) = answer_questions(self.mac, base, tokenizer, [question], entries_for, passages=[passages],
                                   max_new_tokens=max_new_tokens,
                                   head=head if head is not None else prompt_head(base, tokenizer))
        return text, used


def bank_name(artifact: Path) -> str:
    digest = hashlib.sha256((Path(artifact) / "manifest.json").read_bytes()).hexdigest()[:12]
    return f"mac-{digest}"


def load_mac_runtime(
    artifact: Path, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, client, model_settings: ModelSettings,
    top_k: int | None, group_size: int, storage: Storage = "float16",
) -> MacRuntime:
    mac, _ = load_mac(artifact, base.config, settings=model_settings)
    bank = RedisMemoryBank(client, bank=bank_name(artifact), storage=storage)
    return MacRuntime(mac.to(base.device).eval(), bank, Path(artifact), top_k, group_size, base, tokenizer)

"""MAC at run time, the one implementation the harness (``mac``, ``mac_rag``, the pipeline) and the
service share: memorize documents into a ``MemoryBank``, pick each question's top-k entries by
key, answer after them. The harness gives it the in-process bank; the service the Redis bank.

``base`` writes the memory (the amortizer runs it over each document); answers may come from
another instance of the same base model, or through an adapter. ``model_lock`` is held while
writing: when the service's answering model is also the writer, it is the lock asks hold, so a
write never runs under an ask's per-request adapter hooks.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.mac.aggregator import batch_keys, entry_ids, entry_scores, read_entries, stack_memories
from training.mac.amortizer import SlotScores
from training.mac.model import MAC, answer_nll, load_mac, prompt_head, qa_batch, stop_token_ids, strip_head
from training.generation import StepHook
from training.mac.prefix import PrefixKV, PromptHead, greedy_generate
from training.mac.rerotate import read_offsets, rotary_embedding, shift_entry
from training.memory.base import MemoryBank, Storage
from training.models import ModelSettings
from training.prompts import extract_answer
from training.token_batches import prompt_ids


class MacReadConfig(BaseModel):
    """How questions read the memory and how entries are stored (harness and service defaults)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(1, ge=1, description="entries each question reads, by key similarity (none: all); 1 is best on val")
    group_size: int = Field(16, ge=1, description="entries read from the bank at a time")
    rerotate: bool = Field(False, description="give each entry read its own positions by re-rotating its keys "
                                              "(RoPE models; the best entry next to the question)")

    combine: Literal["joint", "separate"] = Field(
        "joint", description="how a question reads its top_k entries: 'joint' (side by side before one answer; "
                             "with rerotate each at its own positions) or 'separate' (each alone, one candidate "
                             "answer per entry decoded as rows of one batch; the candidate with the highest mean "
                             "token log-probability + separate_key_weight x its entry's key cosine wins)")
    separate_key_weight: float = Field(5.0, ge=0, description="'separate': weight of the key cosine against the "
                                                             "answer's mean token log-probability (chosen on val)")

    @model_validator(mode="after")
    def _bounded_positions(self) -> "MacReadConfig":
        if self.rerotate and self.top_k is None:
            raise ValueError("rerotate needs a top_k: every entry of the bank at its own positions would run past "
                             "the model's context")
        if self.combine == "separate" and self.top_k is None:
            raise ValueError("combine='separate' needs a top_k: one decoded row per entry read")
        return self
    storage: Storage = Field("int4", description="how new entries are stored: KIVI int4 (32 % of fp16's bytes; "
                                                       "level with float16 on both val streams, so the default), "
                                                       "float16, int8 (52 %), int2 (19 %), k4v2 / k3v2 (4- / 3-bit "
                                                       "keys, 2-bit values: 22 % / 19 %)")
    doc_slots: int | None = Field(None, ge=1, description="document slots kept per chunk of a new entry, the "
                                                         "highest-scoring ones (none: the artifact's own)")
    slot_scores: SlotScores = Field("h2o", description="how a new entry's document slots are scored: h2o (attention "
                                                       "received from the document) or kvzip (attention received "
                                                       "while the model repeats the document; one more pass)")


def bank_name(artifact: Path) -> str:
    """The bank of an artifact: memory written by one MAC artifact is never read with another."""
    digest = hashlib.sha256((Path(artifact) / "manifest.json").read_bytes()).hexdigest()[:12]
    return f"mac-{digest}"


@dataclass
class MacRuntime:
    mac: MAC
    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    bank: MemoryBank
    config: MacReadConfig = field(default_factory=MacReadConfig)
    model_lock: threading.RLock = field(default_factory=threading.RLock)
    head: PromptHead | None = field(init=False)
    rotary: torch.nn.Module | None = field(init=False, default=None)  # the base's RoPE, with ``rerotate``
    # ids -> texts of documents whose entry is gone (the service reads SQL): answered from the text
    fallback: Callable[[list[str]], dict[str, str]] | None = None

    def __post_init__(self) -> None:
        self.head = prompt_head(self.base, self.tokenizer)
        self.rotary = rotary_embedding(self.base) if self.config.rerotate else None

    def with_bank(self, bank: MemoryBank) -> "MacRuntime":
        """The same runtime (network, model, cached head, lock) over another bank, e.g. one per
        tenant of the service."""
        view = copy.copy(self)
        view.bank = bank
        return view

    # --- writing ---------------------------------------------------------------------------------

    @torch.no_grad()
    def memorize(self, doc_ids: list[str], texts: list[str]) -> None:
        """One base-model forward pass per document chunk; each entry replaces any earlier one (idempotent)."""
        with self.model_lock:
            entries = self.mac.memorize(self.base, self.tokenizer, self.head, texts, self.config.doc_slots,
                                       self.config.slot_scores)
        for doc_id, (memory, key) in zip(doc_ids, entries):
            self.bank.put(doc_id, memory, key)

    def delete(self, doc_id: str) -> bool:
        """Forget a document exactly: its entry is gone."""
        return self.bank.delete(doc_id)

    def question_start(self, head: PromptHead | None | str = "cached", entries: int | None = None) -> int:
        """Position of a question's first token, after the prompt head and the memory slots: one
        chunk's span, or with ``rerotate`` one span per entry read (``entries``, default top_k)."""
        head = self.head if head == "cached" else head
        if not self.config.rerotate:
            return self.mac.start(head)
        entries = entries if entries is not None else (self.config.top_k or 1)
        return self.mac.start(head) + (max(entries, 1) - 1) * self.mac.start(None)

    def stored_bytes(self) -> int:
        return sum(self.bank.nbytes(i) for i in self.bank.ids())

    # --- reading ---------------------------------------------------------------------------------

    @torch.no_grad()
    def read_entries(self, questions: list[str]
                     ) -> tuple[list[list[torch.Tensor]], list[list[str]], list[list[str]], torch.Tensor]:
        """Each question's entries (top-k by key, or all; best first), their ids, the ids chosen
        whose entry was gone (evicted: marked for rebuild), and the questions' keys."""
        keys = self.mac.keys(questions)
        top_k = self.config.top_k
        bank_keys = batch_keys(self.bank, top_k)
        chosen = [entry_ids(self.bank, key, top_k, bank_keys) for key in keys]
        entries, ids, missing = [], [], []
        for row in chosen:
            found, present, gone = read_entries(self.bank, row, chunk=self.config.group_size)
            entries.append(found)
            ids.append(present)
            missing.append(gone)
        gone_ids = sorted({i for row in missing for i in row})
        if gone_ids and hasattr(self.bank, "mark_missing"):
            self.bank.mark_missing(gone_ids)
        return entries, ids, missing, keys

    @torch.no_grad()
    def read_memory(self, questions: list[str], device: torch.device | str
                    ) -> tuple[PrefixKV | None, torch.Tensor | None, list[list[str]], list[list[str]]]:
        """Each question's entries (``read_entries``) side by side with the slot mask, the ids
        read, and the ids chosen whose entry was gone."""
        entries, ids, missing, _ = self.read_entries(questions)
        if self.rotary is not None:  # ids are best first: the best entry gets the span next to the question
            span = self.mac.start(None)
            entries = [[shift_entry(e, offset, self.rotary) for e, offset in zip(row, read_offsets(len(row), span))]
                       for row in entries]
        memory, mask = stack_memories(entries, device)
        return memory, mask, ids, missing

    def read(self, questions: list[str], device: torch.device | str
             ) -> tuple[PrefixKV | None, torch.Tensor | None, list[list[str]]]:
        """``read_memory`` without the missing ids."""
        memory, mask, ids, _ = self.read_memory(questions, device)
        return memory, mask, ids

    def _with_fallback(self, missing: list[list[str]], passages: list[list[str] | None]) -> list[list[str] | None]:
        """Each question's passages after the texts of its entries that were gone (``fallback``:
        ids -> texts, e.g. from SQL), each cut to one chunk of tokens, read as passages instead."""
        wanted = sorted({i for row in missing for i in row})
        if not wanted or self.fallback is None:
            return [p or None for p in passages]
        texts = self.fallback(wanted)
        limit = self.mac.config.chunk_tokens

        def cut(text: str) -> str:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= limit else self.tokenizer.decode(ids[:limit])
        return [([cut(texts[i]) for i in row if texts.get(i)] + (p or [])) or None for row, p in zip(missing, passages)]

    def answer(
        self, model: PreTrainedModel, questions: list[str], passages: list[list[str] | None] | None = None,
        max_new_tokens: int = 24, head: PromptHead | None | str = "cached", deadline: float | None = None,
        on_step: StepHook | None = None,
    ) -> list[tuple[str, list[str]]]:
        """``answer_with_fallback`` without the fallback ids: (answer, ids of the entries read)."""
        return [(text, read) for text, read, _ in
                self.answer_with_fallback(model, questions, passages, max_new_tokens, head, deadline, on_step)]

    @torch.no_grad()
    def answer_with_fallback(
        self, model: PreTrainedModel, questions: list[str], passages: list[list[str] | None] | None = None,
        max_new_tokens: int = 24, head: PromptHead | None | str = "cached", deadline: float | None = None,
        on_step: StepHook | None = None,
    ) -> list[tuple[str, list[str], list[str]]]:
        """Short answers after each question's memory entries (and passages in the prompt), with
        the ids of the entries read and of those answered from their text instead (entries that
        were gone, with a ``fallback``; their texts come before the passages). ``head="cached"``:
        the writer's cached prompt head; when the answering model differs from the writer (an
        adapter is active), pass ``None`` and the head is computed by ``model`` as it is (entries
        were written after the head, so it comes first).
        ``deadline``, ``on_step``: as in ``greedy_generate``."""
        if self.config.combine == "separate":
            return self._answer_separately(model, questions, passages, max_new_tokens, head, deadline, on_step)
        head = self.head if head == "cached" else prompt_head(model, self.tokenizer)
        passages = passages or [None] * len(questions)
        memory, mask, ids, missing = self.read_memory(questions, model.device)
        passages = self._with_fallback(missing, passages)
        prompts = [strip_head(prompt_ids(self.tokenizer, q, p), head) for q, p in zip(questions, passages)]
        outputs = greedy_generate(model, prompts, memory, pad_id=self.tokenizer.pad_token_id,
                                  stop_ids=stop_token_ids(self.tokenizer), max_new_tokens=max_new_tokens,
                                  head=head, memory_mask=mask, deadline=deadline, on_step=on_step,
                                  start=self.question_start(head, max(map(len, ids), default=1)))
        texts = [extract_answer(self.tokenizer.decode(o, skip_special_tokens=True)) for o in outputs]
        return list(zip(texts, ids, [row if self.fallback is not None else [] for row in missing]))

    @torch.no_grad()
    def separate_candidates(
        self, model: PreTrainedModel, questions: list[str], passages: list[list[str] | None] | None = None,
        max_new_tokens: int = 24, head: PromptHead | None | str = "cached", deadline: float | None = None,
        on_step: StepHook | None = None,
    ) -> tuple[list[list["Candidate"]], list[list[str]]]:
        """Each question's candidates, one per entry read (best key first), each entry alone at its
        written positions (a question without an entry: one candidate without memory), decoded as
        rows of one batch; and the ids chosen whose entry was gone. ``on_step`` sees no tokens
        while they decode (which answer wins is known at the end) but still stops a question's
        rows (client gone, deadline)."""
        head = self.head if head == "cached" else prompt_head(model, self.tokenizer)
        passages = passages or [None] * len(questions)
        entries, ids, missing, keys = self.read_entries(questions)
        passages = self._with_fallback(missing, passages)
        rows = [(q, j) for q in range(len(questions)) for j in range(max(len(entries[q]), 1))]
        memory, mask = stack_memories([[entries[q][j]] if entries[q] else [] for q, j in rows], model.device)
        prompts = [strip_head(prompt_ids(self.tokenizer, questions[q], passages[q]), head) for q, _ in rows]

        def row_hook(tokens: dict[int, int | None]) -> set[int]:
            stopped = on_step({q: None for q in {rows[r][0] for r in tokens}})  # no tokens: nothing streams
            return {r for r in tokens if rows[r][0] in stopped}

        logprobs: list[list[float]] = [[] for _ in rows]
        outputs = greedy_generate(model, prompts, memory, pad_id=self.tokenizer.pad_token_id,
                                  stop_ids=stop_token_ids(self.tokenizer), max_new_tokens=max_new_tokens,
                                  head=head, memory_mask=mask, deadline=deadline,
                                  on_step=row_hook if on_step is not None else None,
                                  start=self.question_start(head, 1), token_logprobs=logprobs)
        cosines = [entry_scores(self.bank, keys[q], ids[q]) for q in range(len(questions))]
        candidates: list[list[Candidate]] = [[] for _ in questions]
        for r, (q, j) in enumerate(rows):
            candidates[q].append(Candidate(
                extract_answer(self.tokenizer.decode(outputs[r], skip_special_tokens=True)),
                ids[q][j] if ids[q] else None, sum(logprobs[r]) / max(len(logprobs[r]), 1),
                cosines[q][j] if ids[q] else 0.0, tuple(outputs[r])))
        return candidates, missing

    def _answer_separately(
        self, model: PreTrainedModel, questions: list[str], passages: list[list[str] | None] | None,
        max_new_tokens: int, head: PromptHead | None | str, deadline: float | None, on_step: StepHook | None,
    ) -> list[tuple[str, list[str], list[str]]]:
        """``combine='separate'``: each question's best candidate (``Candidate.score``); the ids
        read are its entry's. ``on_step`` then sees the winners' tokens, step by step (a stream
        gets each answer at once, when it is chosen)."""
        candidates, missing = self.separate_candidates(model, questions, passages, max_new_tokens, head, deadline,
                                                       on_step)
        best = [max(row, key=lambda c: c.score(self.config.separate_key_weight)) for row in candidates]
        if on_step is not None:
            for step in range(max((len(c.token_ids) for c in best), default=0)):
                on_step({q: c.token_ids[step] for q, c in enumerate(best) if step < len(c.token_ids)})
        return [(c.answer, [c.doc_id] if c.doc_id is not None else [], gone if self.fallback is not None else [])
                for c, gone in zip(best, missing)]

    @torch.no_grad()
    def choice_scores(self, model: PreTrainedModel, question: str, choices: list[str],
                      passages: list[str] | None = None, head: PromptHead | None | str = "cached") -> list[float]:
        """Mean per-token log-probability of each choice (as ``choice_logprobs``) after the memory
        (``head`` as in ``answer``)."""
        head = self.head if head == "cached" else prompt_head(model, self.tokenizer)
        if self.config.combine == "separate":
            return self._choice_scores_separately(model, question, choices, passages, head)
        memory, mask, ids, missing = self.read_memory([question], model.device)
        (passages,) = self._with_fallback(missing, [passages])
        n = len(choices)
        if memory is not None:
            memory = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in memory]
            mask = mask.expand(n, -1)
        start = self.question_start(head, len(ids[0]))
        tokens, tokens_mask, labels = qa_batch(self.tokenizer, [question] * n, choices, [passages] * n,
                                               device=model.device, head=head)
        return (-answer_nll(model, memory, tokens, tokens_mask, labels, head=head, memory_mask=mask,
                            start=start)).tolist()

    def _choice_scores_separately(self, model: PreTrainedModel, question: str, choices: list[str],
                                  passages: list[str] | None, head: PromptHead | None) -> list[float]:
        """``combine='separate'``: each choice's mean log-probability after each entry alone, plus
        ``separate_key_weight`` x that entry's key cosine; a choice scores its best entry's value."""
        entries, ids, missing, keys = self.read_entries([question])
        (passages,) = self._with_fallback(missing, [passages])
        n = len(choices)
        tokens, tokens_mask, labels = qa_batch(self.tokenizer, [question] * n, choices, [passages] * n,
                                               device=model.device, head=head)
        best = None
        for entry, score in zip(entries[0] or [None], entry_scores(self.bank, keys[0], ids[0]) or [0.0]):
            memory, mask = stack_memories([[entry] if entry is not None else [] for _ in choices], model.device)
            values = -answer_nll(model, memory, tokens, tokens_mask, labels, head=head, memory_mask=mask,
                                 start=self.question_start(head, 1)) + self.config.separate_key_weight * score
            best = values if best is None else torch.maximum(best, values)
        return best.tolist()


@dataclass(frozen=True)
class Candidate:
    """An answer read from one entry alone (``combine='separate'``)."""

    answer: str
    doc_id: str | None  # the entry read (None: the question had none)
    mean_logprob: float  # of the answer's tokens and its stop token: how sure the model is with that entry
    key_cosine: float  # the entry's key against the question's: how likely the entry is the question's
    token_ids: tuple[int, ...] = ()  # the answer as generated (before ``extract_answer``)

    def score(self, key_weight: float) -> float:
        """RAG-Sequence's choice (Lewis et al. 2020) with the retrieval score as the prior."""
        return self.mean_logprob + key_weight * self.key_cosine


_LOADED: dict[tuple[str, str], MAC] = {}


def load_mac_runtime(
    artifact: Path, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bank: MemoryBank,
    config: MacReadConfig | None = None, model_settings: ModelSettings | None = None,
) -> MacRuntime:
    """The runtime of a MAC artifact on ``base`` (refused if trained for another base model or
    QA tuning); the network is loaded once per process and base model."""
    from training.artifacts import config_hash

    key = (str(Path(artifact).expanduser().resolve()), f"{config_hash(base.config)}@{base.device}")
    if key not in _LOADED:
        mac, _ = load_mac(key[0], base.config, settings=model_settings)
        _LOADED[key] = mac.to(base.device).eval()
    return MacRuntime(_LOADED[key], base, tokenizer, bank, config or MacReadConfig())

"""The per-document update bank at run time: one implementation for the harness (``update_bank``)
and the service (``FRESHLM_UPDATE_BANK``: the worker memorizes, the ask scheduler answers).

Ingest: the online update of ``training.updates`` (a meta-trained init's step, a CaMeLS-weighted
step, ...) takes ONE step from the init on the document alone; what it moved (the LoRA tensors'
change, a delta of rank <= 2r in weight space) is packed into one bank entry with the document's
MiniLM key, and the adapter is reset to the init. Nothing accumulates, so no document's step
interferes with another's. Deleting a document deletes its entry: exact. Rebuilding is
re-memorizing the documents.

Ask: each question's top-k entries by key (``training.mac.aggregator.entry_ids``, as MAC selects
its entries; with ``key="hybrid"`` that ranking fused with BM25 over the entries' documents, as
``rag_hybrid`` fuses them) become a per-request PEFT adapter ("slot") holding init + their deltas,
and the question is generated with ``adapter_names`` = its slot, so a batch mixes documents'
updates row by row and no global ``set_adapter`` is ever called. Rows without an entry use the init.

``model_lock`` guards the shared adapter state (the init's adapter during a step, the slots while
they are written and used); ``with_bank`` gives a view over another bank (a tenant's) that shares
the model, its slots and the lock.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.choice_scoring import choice_logprobs
from training.generation import StepHook, generate_answers
from training.mac.aggregator import batch_keys, entry_ids
from training.memory.base import MemoryBank
from training.models import DEFAULT_ENCODER, embed_texts, load_encoder
from training.prompts import qa_messages
from training.retrieval import BM25Index
from training.retrievers import rrf_fuse
from training.types import Document
from training.updaters import load_updater
from training.updates import LoraUpdater, UpdateConfig

ROW = 64  # values per stored row: int8 storage keeps one scale per row, as for MAC's slot vectors
INIT = "__init__"  # rows whose question selects no entry
HYBRID_DEPTH = 100  # entries each ranking contributes to the fusion (as ``HybridIndex``)
WHOLE_DOCUMENT = 10**9  # BM25 words per passage: one passage per entry


class UpdateBankConfig(BaseModel):
    """How documents' updates are kept and read (the harness's defaults; the service's later)."""

    model_config = ConfigDict(extra="forbid")

    updater: str | None = Field(
        None, description="whose single step each document takes: a meta-trained init or CaMeLS artifact, or "
                          "'uniform' (none: the meta_ft artifact the meta_ft methods use)")
    encoder: str = Field(DEFAULT_ENCODER, description="key encoder of documents and questions (MAC's MiniLM)")
    key_tokens: int = Field(256, ge=8, description="encoder tokens a key reads")
    key: Literal["dense", "hybrid"] = Field(
        "dense", description="how a question finds its entries: 'dense' (its MiniLM key against the entries', as "
                             "MAC reads) or 'hybrid' (that ranking fused with a BM25 ranking of the entries' documents "
                             "by reciprocal-rank fusion, as rag_hybrid; squad-seq test R@1 90.6 % against 86.0 %)")
    top_k: int = Field(1, ge=1, description="entries a question applies (their deltas add up)")
    storage: Literal["float16", "int8"] = Field("int8", description="how entries are stored: int8 (one scale per 64 "
                                                                     "values: half of float16's bytes, the same answers "
                                                                     "on squad-seq val and test, so the default) or "
                                                                     "float16 (KIVI storage is for key/value entries only)")
    slots: int = Field(16, ge=1, description="per-request adapters in the model: questions answered in one batch")


@dataclass(frozen=True)
class DeltaLayout:
    """Which adapter tensors one step moves (PEFT state-dict names) and their shapes: a bank entry
    is their changes, flattened in this order and cut into rows of ``ROW`` values."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, init: dict[str, torch.Tensor], steps_per_document: int) -> "DeltaLayout":
        """From the fresh adapter (B = 0) ONE step moves only the B matrices (A's gradient is B^T x ... = 0):
        the entry then holds B's change alone, half the bytes."""
        fresh = steps_per_document == 1 and all(not t.any() for n, t in init.items() if "lora_B" in n)
        names = tuple(n for n in init if not (fresh and "lora_A" in n))
        return cls(names, tuple(init[n].shape for n in names))

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def pack(self, delta: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([delta[n].detach().float().reshape(-1).cpu() for n in self.names])
        return torch.nn.functional.pad(flat, (0, -len(flat) % ROW)).view(-1, ROW)

    def unpack(self, entry: torch.Tensor) -> dict[str, torch.Tensor]:
        flat, out, start = entry.reshape(-1), {}, 0
        for name, shape in zip(self.names, self.shapes):
            out[name] = flat[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return out


@dataclass
class UpdateBankRuntime:
    updater: LoraUpdater  # the init's adapter and the online update (reset to the init after every step)
    encoder: PreTrainedModel
    encoder_tokenizer: PreTrainedTokenizerBase
    bank: MemoryBank
    config: UpdateBankConfig = field(default_factory=UpdateBankConfig)
    model_lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.init = self.updater.adapter_tensors()
        self._init_state = self.updater.snapshot()
        self.layout = DeltaLayout.of(self.init, self.updater.config.steps_per_document)
        self._slots = self._add_slots()
        # hybrid keys: the entries' documents by BM25, in process (rebuilt with the bank from the documents)
        self._lexical = BM25Index(max_words=WHOLE_DOCUMENT) if self.config.key == "hybrid" else None

    @property
    def model(self) -> PreTrainedModel:
        return self.updater.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.updater.tokenizer

    # --- writing ---------------------------------------------------------------------------------

    def memorize(self, doc_ids: list[str], texts: list[str]) -> int:
        """One step from the init per document, kept as its entry (replacing any earlier one);
        returns the number stored (a skipped or guard-rejected step stores nothing)."""
        keys = embed_texts(self.encoder, self.encoder_tokenizer, texts, self.config.key_tokens)
        stored = 0
        for doc_id, text, key in zip(doc_ids, texts, keys):
            with self.model_lock:
                result = self.updater.step(text)
                moved = self.updater.adapter_tensors() if result.accepted else None
                self.updater.restore(self._init_state)
            if moved is not None:
                self.bank.put(doc_id, self.layout.pack({n: moved[n] - self.init[n] for n in self.layout.names}), key)
                if self._lexical is not None:
                    self._lexical.add([Document(doc_id, text)])
                stored += 1
        return stored

    def delete(self, doc_id: str) -> bool:
        """Forget a document exactly: its entry is gone, nothing of it stays in any weight."""
        if self._lexical is not None:
            self._lexical.remove([doc_id])
        return self.bank.delete(doc_id)

    def with_bank(self, bank: MemoryBank) -> "UpdateBankRuntime":
        """The same runtime over another bank (a tenant's): model, init, slots and lock shared.
        Hybrid keys hold a BM25 index of one bank's documents in process, so they have no views."""
        if self._lexical is not None:
            raise ValueError("an update bank with hybrid keys cannot be viewed over another bank")
        view = copy.copy(self)  # not ``replace``: that would run __post_init__ and add slots again
        view.bank = bank
        return view

    def rebuild(self, doc_ids: list[str], texts: list[str]) -> int:
        """The bank from the documents alone (after a restore, or for a new init)."""
        self.bank.clear()
        if self._lexical is not None:
            self._lexical.remove(list(self._lexical.documents()))
        return self.memorize(doc_ids, texts)

    def stored_bytes(self) -> int:
        return sum(self.bank.nbytes(i) for i in self.bank.ids())

    # --- reading ---------------------------------------------------------------------------------

    def read(self, questions: list[str]) -> list[list[str]]:
        """The ids of each question's top-k entries by key similarity (fused with BM25 for hybrid keys)."""
        keys = embed_texts(self.encoder, self.encoder_tokenizer, questions, self.config.key_tokens)
        top_k = self.config.top_k
        bank_keys = batch_keys(self.bank, top_k)  # as MAC reads
        if self._lexical is None:
            return [entry_ids(self.bank, key, top_k, bank_keys) for key in keys]
        out = []
        for question, key in zip(questions, keys):
            dense = entry_ids(self.bank, key, HYBRID_DEPTH, bank_keys)
            lexical = [hit.doc_id for hit in self._lexical.search(question, HYBRID_DEPTH)]
            out.append([doc_id for doc_id, _ in rrf_fuse([lexical, dense])[:top_k]])
        return out

    def answer(self, questions: list[str], passages: list[list[str] | None] | None = None,
               max_new_tokens: int = 24, deadline: float | None = None,
               on_step: StepHook | None = None) -> list[tuple[str, list[str]]]:
        """Short answers, each generated with its question's entries applied, and the ids read.
        ``deadline``, ``on_step`` (indices = positions in ``questions``): as ``generate_answers``."""
        passages = passages or [None] * len(questions)
        ids = self.read(questions)
        out: list[tuple[str, list[str]]] = []
        for start in range(0, len(questions), self.config.slots):
            chunk = range(start, min(start + self.config.slots, len(questions)))
            hook = None if on_step is None else _offset(on_step, start)
            with self.model_lock:
                names = self._load([ids[i] for i in chunk])
                texts = generate_answers(self.model, self.tokenizer, [qa_messages(questions[i], passages[i]) for i in chunk],
                                         max_new_tokens, batch_size=len(chunk), deadline=deadline, on_step=hook,
                                         adapter_names=names)
            out += [(text, ids[i]) for text, i in zip(texts, chunk)]
        return out

    def choice_scores(self, question: str, choices: list[str], passages: list[str] | None = None) -> list[float]:
        """``choice_logprobs`` with the question's entries applied."""
        with self.model_lock:
            (name,) = self._load(self.read([question]))
            return choice_logprobs(self.model, self.tokenizer, qa_messages(question, passages), choices,
                                   adapter_name=name)

    # --- per-request adapters ----------------------------------------------------------------------

    def _add_slots(self) -> list[dict[str, torch.Tensor]]:
        """``config.slots`` extra adapters of rank ``r * m`` (m = top_k, + 1 for a trained init when
        several entries add up) with the init's scale; returns their parameters by state-dict name."""
        peft, name = self.model, self.updater.adapter_name
        init_config = peft.peft_config[name]
        self._multiple = self.config.top_k + (1 if self.config.top_k > 1 and self._trained_init() else 0)
        slot_config = copy.deepcopy(init_config)
        slot_config.r = init_config.r * self._multiple
        slot_config.lora_alpha = init_config.lora_alpha * self._multiple  # scale alpha / r unchanged
        if init_config.rank_pattern or init_config.alpha_pattern:
            raise ValueError("per-module LoRA ranks are not supported by the update bank")
        slots = []
        for index in range(self.config.slots):
            slot = f"bank{index}"
            peft.add_adapter(slot, slot_config)
            slots.append({key: peft.get_parameter(_live_name(key, slot)) for key in self.init})
        for slot in slots:
            for p in slot.values():
                p.requires_grad_(False)
        for p in self.updater.params:  # adding adapters must not freeze the update's own
            p.requires_grad_(True)
        peft.eval()  # per-request adapter_names needs eval mode
        return slots

    def _trained_init(self) -> bool:
        return any(t.any() for n, t in self.init.items() if "lora_B" in n)

    @torch.no_grad()
    def _load(self, per_question: list[list[str]]) -> list[str]:
        """Write each distinct entry set into a slot; the adapter name each question is asked with."""
        names, loaded = [], {}
        for chosen in per_question:
            key = tuple(chosen)
            if not key:
                names.append(self.updater.adapter_name)  # the init itself
                continue
            if key not in loaded:
                loaded[key] = len(loaded)
                self._write(self._slots[loaded[key]], [e for e in self.bank.get(list(key)) if e is not None])
            names.append(f"bank{loaded[key]}")
        return names

    def _write(self, slot: dict[str, torch.Tensor], entries: list[torch.Tensor]) -> None:
        """Slot = init + sum of the entries' deltas, as one LoRA of rank ``r * m``: a block
        (B_j, A_j) = init + delta_j per entry and, when several add up over a trained init, a last
        block (-(k-1) B_0, A_0) that removes the init counted k times; unused blocks are zero."""
        deltas = [self.layout.unpack(e) for e in entries] or [{}]  # no entry left: the init alone
        for key, param in slot.items():
            init, rows = self.init[key], "lora_A" in key  # A: [r, in] (blocks are rows); B: [out, r]
            parts = [init + d[key].to(init.dtype) if key in d else init for d in deltas]
            if len(deltas) > 1 and self._trained_init():
                parts.append(init if rows else -(len(deltas) - 1) * init)
            value = torch.cat(parts, dim=0 if rows else 1)
            param.zero_()
            (param[: value.shape[0]] if rows else param[:, : value.shape[1]]).copy_(value)


def build_update_bank(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, update: UpdateConfig, bank: MemoryBank,
    config: UpdateBankConfig, updater: str, lr: float | None = None,
    encoder: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> UpdateBankRuntime:
    """The bank of an updater setting (``training.updaters``: ``uniform``, a CaMeLS or a meta-trained
    init artifact, ``lr`` overriding its own) on ``model`` (wrapped in place), keyed by
    ``config.encoder`` (or an ``encoder`` already loaded): what the harness and the service build."""
    spec = load_updater(updater, model, tokenizer, update, lr=lr)
    encoder_model, encoder_tokenizer = encoder if encoder is not None else load_encoder(config.encoder)
    return UpdateBankRuntime(LoraUpdater(model, tokenizer, spec.token_weights, spec.config, initial=spec.initial),
                             encoder_model.to(model.device), encoder_tokenizer, bank, config)


def _offset(hook: StepHook, start: int) -> StepHook:
    """``hook`` of a whole call seen from one chunk of it, whose first prompt is ``start``."""
    return lambda tokens: {i - start for i in hook({i + start: t for i, t in tokens.items()})}


def _live_name(state_key: str, adapter: str) -> str:
    """``...q_proj.lora_A.weight`` (a PEFT state-dict key) -> the parameter of adapter ``adapter``."""
    for part in ("lora_A", "lora_B"):
        if f".{part}." in state_key:
            return state_key.replace(f".{part}.", f".{part}.{adapter}.")
    raise ValueError(f"not a LoRA weight: {state_key}")

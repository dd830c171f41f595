"""``mac`` and ``mac_rag`` as evaluation-harness methods: ``training.mac.runtime.MacRuntime`` (the
service's MAC) over the in-process memory bank.

Ingesting a document is one forward pass of the base model with the amortizer's memory tokens; its
entry (and retrieval key) goes into the bank. Answering reads each question's top-k entries by key
similarity (all of them without ``top_k``) and generates after them. ``mac_rag`` also puts the top
BM25 passages in the prompt. Deleting a document is ``runtime.delete``. ``mac_read:<settings>``
is ``mac`` with other read / storage settings than ``MethodConfig.mac`` (e.g.
``mac_read:int4-k2-rot`` = int4 storage, top 2, re-rotated keys), so one harness run compares them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import get_args

import torch

from training.artifacts import configured_artifact
from training.mac.amortizer import SlotScores
from training.mac.runtime import MacReadConfig, MacRuntime, load_mac_runtime
from training.memory import STORAGES, InMemoryMemoryBank
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.retrieval import BM25Index
from training.types import Document, Question

def mac_artifact_path(ctx: MethodContext) -> Path:
    """``MethodConfig.mac_artifact``, else ``$FRESHLM_MAC_ARTIFACT``, else the shipped artifact."""
    return configured_artifact("mac", ctx.config.mac_artifact, "FRESHLM_MAC_ARTIFACT", ctx.config.base_model)


def harness_runtime(ctx: MethodContext) -> MacRuntime:
    """The configured artifact's runtime over a fresh in-process bank."""
    config = ctx.config.mac
    return load_mac_runtime(mac_artifact_path(ctx), ctx.model, ctx.tokenizer, InMemoryMemoryBank(config.storage), config)


class MACMethod:
    name = "mac"

    def __init__(self, ctx: MethodContext, runtime: MacRuntime, rag: bool = False) -> None:
        self.ctx, self.runtime, self.rag = ctx, runtime, rag
        self.documents: dict[str, Document] = {}
        self._index: BM25Index | None = None
        if rag:
            self.name = "mac_rag"

    def ingest(self, document: Document) -> None:
        self.runtime.memorize([document.id], [document.text])
        if self.rag:
            self.documents[document.id] = document
            self._index = None

    def delete(self, doc_id: str) -> bool:
        """Forget a document exactly: its entry (and passages) are gone."""
        self.documents.pop(doc_id, None)
        self._index = None
        return self.runtime.delete(doc_id)

    def _passages(self, question: Question) -> list[str] | None:
        if not self.rag or not self.documents:
            return None
        if self._index is None:
            self._index = BM25Index(list(self.documents.values()), self.ctx.config.rag_passage_words)
        return [p.text for p in self._index.search(question.question, self.ctx.config.rag_k)] or None

    def answer(self, questions: list[Question]) -> list[str]:
        answers: list[str] = []
        size = self.ctx.config.batch_size
        for start in range(0, len(questions), size):
            batch = questions[start : start + size]
            answered = self.runtime.answer(self.ctx.model, [q.question for q in batch],
                                           [self._passages(q) for q in batch], self.ctx.config.max_new_tokens)
            answers += [text for text, _ in answered]
        return answers

    def choice_scores(self, question: Question) -> list[float]:
        return self.runtime.choice_scores(self.ctx.model, question.question, list(question.choices or ()),
                                          self._passages(question))

    def stored_bytes(self) -> int:
        return self.runtime.stored_bytes()

    def close(self) -> None:
        self.runtime.bank.clear()
        self.documents.clear()
        self._index = None


def parse_read_settings(spec: str, base: MacReadConfig) -> MacReadConfig:
    """``float16|int8|int4|int2|k4v2|k3v2``, ``k<N>`` (top k; ``kall``: every entry), ``rot`` / ``norot``,
    ``sep`` / ``joint`` (the top k read each alone or side by side), ``s<N>`` (document slots kept per
    chunk), ``h2o`` / ``kvzip`` (how they are scored), joined by ``-`` (the harness splits its method
    list on commas), over ``base``."""
    update: dict = {}
    for part in filter(None, (p.strip() for p in spec.split("-"))):
        if part in STORAGES:
            update["storage"] = part
        elif part in ("rot", "norot"):
            update["rerotate"] = part == "rot"
        elif part in ("sep", "joint"):
            update["combine"] = "separate" if part == "sep" else "joint"
        elif part in get_args(SlotScores):
            update["slot_scores"] = part
        elif part == "kall":
            update["top_k"] = None
        elif part[:1] in ("k", "s") and part[1:].isdigit() and int(part[1:]) >= 1:
            update["top_k" if part[0] == "k" else "doc_slots"] = int(part[1:])
        else:
            raise ValueError(f"mac_read:{spec}: unknown setting {part!r} (a storage {STORAGES}, k<N>, kall, rot, "
                             f"norot, sep, joint, s<N>, {', '.join(get_args(SlotScores))})")
    return MacReadConfig.model_validate(base.model_dump() | update)


# (artifact, slots, slot scores, text) -> fp32 entry, key
_WRITTEN: dict[tuple[str, int | None, str, str], tuple[torch.Tensor, torch.Tensor]] = {}


class SharedIngestMAC(MACMethod):
    """``mac_read``: the read settings do not change what is written, so each document is written
    once per process and slot count (one base-model pass) and every ``mac_read`` method of the run stores that
    entry in its own bank (quantized as its storage says). Its ``ingest_seconds_per_doc`` is the
    write's only for the first ``mac_read`` method of a run."""

    def __init__(self, ctx: MethodContext, runtime: MacRuntime, artifact: Path) -> None:
        super().__init__(ctx, runtime)
        self.artifact = str(artifact)

    def ingest(self, document: Document) -> None:
        runtime = self.runtime
        name = (self.artifact, runtime.config.doc_slots, runtime.config.slot_scores, document.text)
        written = _WRITTEN.get(name)
        cache = self._cache_file(document.text)
        if written is None and cache is not None and cache.exists():
            written = _WRITTEN[name] = tuple(torch.load(cache, weights_only=True))
        if written is None:
            with runtime.model_lock:
                ((memory, key),) = runtime.mac.memorize(runtime.base, runtime.tokenizer, runtime.head, [document.text],
                                                        runtime.config.doc_slots, runtime.config.slot_scores)
            written = _WRITTEN[name] = (memory.detach().cpu(), key.detach().cpu())
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(list(written), cache)
        self.runtime.bank.put(document.id, *written)

    def _cache_file(self, text: str) -> Path | None:
        """``MethodConfig.mac_write_cache``: entries kept on disk across runs (a run cut short
        resumes without writing them again), named by the artifact's manifest and the text."""
        root = self.ctx.config.mac_write_cache
        if root is None:
            return None
        manifest = (Path(self.artifact) / "manifest.json").read_bytes()
        config = self.runtime.config
        slots = b"" if config.doc_slots is None else f"slots={config.doc_slots}".encode()
        scores = b"" if config.slot_scores == "h2o" else f"scores={config.slot_scores}".encode()  # old names stay valid
        return Path(root) / f"{hashlib.sha256(manifest + slots + scores + text.encode()).hexdigest()[:32]}.pt"


@register_method("mac_read", family=True)
def build_mac_read(ctx: MethodContext, spec: str) -> MACMethod:
    config = parse_read_settings(spec, ctx.config.mac)
    artifact = mac_artifact_path(ctx)
    runtime = load_mac_runtime(artifact, ctx.model, ctx.tokenizer, InMemoryMemoryBank(config.storage), config)
    return SharedIngestMAC(ctx, runtime, artifact)


@register_method("mac")
def build_mac(ctx: MethodContext) -> MACMethod:
    return MACMethod(ctx, harness_runtime(ctx))


@register_method("mac_rag")
def build_mac_rag(ctx: MethodContext) -> MACMethod:
    return MACMethod(ctx, harness_runtime(ctx), rag=True)

"""The worker's side of adapter versions: ``training.updates.LoraUpdater`` (the update the harness
measures) on the worker's private copy of the base model, wrapped with versioning and persistence.

For each document the update is applied to the live adapter; an accepted step becomes a new
immutable version (weights + the optimizer state it reached) that is recorded and activated in
the caller's transaction, so the document is marked ingested in the same commit that activates
its version: an update is applied exactly once even across ``kill -9``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.adapters import store
from service.db import REBUILD_ADAPTER_KEY, DocumentRecord, set_state
from training.updaters import load_updater
from training.updates import LoraUpdater, UpdateConfig

log = logging.getLogger("freshlm.adapters")
ADAPTER = "live"


class SwapConflict(Exception):
    """The active adapter changed (a rollback) while this worker computed an update."""


@dataclass
class AdapterPublisher:
    updater: LoraUpdater
    sessions: sessionmaker[Session]
    root: Path
    info: dict[str, Any] = field(default_factory=dict)
    live_version: str | None = None

    @property
    def lora_config(self) -> dict[str, Any]:
        return self.updater.config.lora.model_dump()

    def _save(self) -> str:
        return store.save_weights(self.root, self.updater.adapter_tensors(), self.lora_config,
                                  self.updater.optimizer_tensors())

    def sync(self) -> None:
        """Make the live adapter the active version (first run: publish the initial one)."""
        with self.sessions() as session:
            active = store.active_version(session)
        if active is None:
            version = self._save()
            with self.sessions.begin() as session:
                store.record_version(session, version, parent=None, kind="initial", documents=[], metrics={**self.info})
                store.activate(session, version, expected=None)
            with self.sessions() as session:
                active = store.active_version(session)
        if active != self.live_version:
            tensors, _config = store.load_weights(self.root, active)
            self.updater.load_adapter(tensors, store.load_optimizer(self.root, active))
            self.live_version = active
            log.info("worker adapter is now version %s", active)

    def absorb(self, session: Session, doc: DocumentRecord, values: dict) -> tuple | None:
        """One update from ``doc``; records and activates the new version in ``session`` and
        returns the snapshot that undoes it (if the caller's commit does not happen)."""
        snapshot = self.updater.snapshot()
        result = self.updater.step(doc.text)
        if not result.accepted:
            values["adapter_note"] = f"update rejected: {result.reason}"
            return None
        version = self._save()
        store.record_version(session, version, parent=self.live_version, kind="update",
                             documents=[doc.id], metrics=result.metrics)
        if not store.activate(session, version, expected=self.live_version):
            self.updater.restore(snapshot)
            raise SwapConflict(doc.id)
        values["adapter_version"] = version
        return snapshot

    def rebuild(self, docs: list[DocumentRecord]) -> str | None:
        """Replay the updates of ``docs`` (in ingest order) from the initial version: the way to take
        a deleted document out of the adapter. Activates the result."""
        with self.sessions() as session:
            initial = [v for v in store.list_versions(session) if v.kind == "initial"]
        if not initial:
            return None
        tensors, _ = store.load_weights(self.root, initial[0].version)
        self.updater.load_adapter(tensors, store.load_optimizer(self.root, initial[0].version))
        absorbed, metrics = [], {"rejected": 0}
        for doc in docs:
            if self.updater.step(doc.text).accepted:
                absorbed.append(doc.id)
            else:
                metrics["rejected"] += 1
        version = self._save()
        with self.sessions.begin() as session:
            store.record_version(session, version, parent=None, kind="rebuild", documents=absorbed, metrics=metrics)
            store.activate(session, version)
            set_state(session, REBUILD_ADAPTER_KEY, None)
        self.live_version = version
        log.info("adapter rebuilt from %d documents: version %s", len(absorbed), version)
        return version

    def prune(self, keep: int) -> list[str]:
        with self.sessions() as session:
            return store.prune(session, self.root, keep)


def build_publisher(
    updater: str, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: UpdateConfig,
    sessions: sessionmaker[Session], root: Path, lr: float | None = None,
) -> AdapterPublisher:
    """The publisher of an updater setting (``uniform`` or an artifact) on a private copy of ``base``."""
    private = copy.deepcopy(base)  # never shared with answering
    spec = load_updater(updater, private, tokenizer, config, lr=lr)
    update = spec.config.model_copy(update={"lora": spec.config.lora.resolved(private)})
    live = LoraUpdater(private, tokenizer, spec.token_weights, update, initial=spec.initial, adapter_name=ADAPTER)
    return AdapterPublisher(live, sessions, root, info=spec.info)

"""The worker's side of adapter versions: ``training.updates.LoraUpdater`` (the update the harness
measures) on the worker's private copy of the base model, wrapped with versioning and persistence.

Every tenant has its own lineage, starting from the same initial adapter: before an update the
updater is loaded with the tenant's active version (``sync``), so one tenant's documents never
reach another's adapter. For each document the update is applied to the live adapter; an accepted
step becomes a new immutable version (weights + the optimizer state it reached) that is recorded
and activated in the caller's transaction, so the document is marked ingested in the same commit
that activates its version: an update is applied exactly once even across ``kill -9``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.adapters import store
from service.db import REBUILD_ADAPTER_KEY, Database, DocumentRecord, set_state
from training.updaters import load_updater
from training.updates import LoraUpdater, UpdateConfig

log = logging.getLogger("freshlm.adapters")
ADAPTER = "live"


class SwapConflict(Exception):
    """The active adapter changed (a rollback) while this worker computed an update."""


@dataclass
class AdapterPublisher:
    updater: LoraUpdater
    db: Database
    root: Path
    info: dict[str, Any] = field(default_factory=dict)
    live: tuple[str, str] | None = None  # (tenant, version) the updater holds now
    initial: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.initial = self.updater.adapter_tensors()  # every tenant's lineage starts here

    @property
    def lora_config(self) -> dict[str, Any]:
        return self.updater.config.lora.model_dump()

    def _save(self) -> str:
        return store.save_weights(self.root, self.updater.adapter_tensors(), self.lora_config,
                                  self.updater.optimizer_tensors())

    def _publish_initial(self, tenant: str) -> None:
        version = store.save_weights(self.root, self.initial, self.lora_config)
        with self.db.write.begin() as session:
            store.record_version(session, tenant, version, parent=None, kind="initial", documents=[],
                                 metrics={**self.info})
            store.activate(session, tenant, version, expected=None)

    def sync(self, tenant: str) -> None:
        """Make the live adapter the tenant's active version (first time: publish its initial one)."""
        with self.db.read() as session:
            active = store.active_version(session, tenant)
        if active is None:
            self._publish_initial(tenant)
            with self.db.read() as session:
                active = store.active_version(session, tenant)
        if self.live != (tenant, active):
            tensors, _config = store.load_weights(self.root, active)
            self.updater.load_adapter(tensors, store.load_optimizer(self.root, active))
            self.live = (tenant, active)
            log.info("worker adapter is now version %s of tenant %s", active, tenant)

    def absorb(self, session: Session, doc: DocumentRecord, values: dict) -> tuple | None:
        """One update from ``doc`` (after ``sync(doc.tenant_id)``); records and activates the new
        version in ``session`` and returns the snapshot that undoes it (if the caller's commit does
        not happen)."""
        tenant, parent = self.live
        assert tenant == doc.tenant_id, "sync the document's tenant first"
        snapshot = self.updater.snapshot()
        result = self.updater.step(doc.text)
        if not result.accepted:
            values["adapter_note"] = f"update rejected: {result.reason}"
            return None
        version = self._save()
        store.record_version(session, tenant, version, parent=parent, kind="update", documents=[doc.id],
                             metrics=result.metrics)
        if not store.activate(session, tenant, version, expected=parent):
            self.updater.restore(snapshot)
            raise SwapConflict(doc.id)
        values["adapter_version"] = version
        return snapshot

    def rebuild(self, tenant: str, docs: list[DocumentRecord]) -> str | None:
        """Replay the updates of ``docs`` (in ingest order) from the tenant's initial version: the
        way to take a deleted document out of the adapter. Activates the result."""
        with self.db.read() as session:
            initial = [v for v in store.list_versions(session, tenant) if v.kind == "initial"]
        if not initial:
            return None
        tensors, _ = store.load_weights(self.root, initial[0].version)
        self.updater.load_adapter(tensors, store.load_optimizer(self.root, initial[0].version))
        self.live = None
        absorbed, metrics = [], {"rejected": 0}
        for doc in docs:
            if self.updater.step(doc.text).accepted:
                absorbed.append(doc.id)
            else:
                metrics["rejected"] += 1
        version = self._save()
        with self.db.write.begin() as session:
            store.record_version(session, tenant, version, parent=None, kind="rebuild", documents=absorbed,
                                 metrics=metrics)
            store.activate(session, tenant, version)
            set_state(session, tenant, REBUILD_ADAPTER_KEY, None)
        self.live = (tenant, version)
        log.info("adapter of tenant %s rebuilt from %d documents: version %s", tenant, len(absorbed), version)
        return version

    def prune(self, keep: int) -> list[str]:
        with self.db.read() as session:
            return store.prune(session, self.root, keep)


def build_publisher(
    updater: str, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: UpdateConfig,
    db: Database, root: Path, lr: float | None = None,
) -> AdapterPublisher:
    """The publisher of an updater setting (``uniform`` or an artifact) on a private copy of ``base``."""
    private = copy.deepcopy(base)  # never shared with answering
    spec = load_updater(updater, private, tokenizer, config, lr=lr)
    update = spec.config.model_copy(update={"lora": spec.config.lora.resolved(private)})
    live = LoraUpdater(private, tokenizer, spec.token_weights, update, initial=spec.initial, adapter_name=ADAPTER)
    return AdapterPublisher(live, db, root, info=spec.info)

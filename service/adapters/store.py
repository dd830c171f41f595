"""Immutable, content-addressed adapter versions: weights on disk, lineage and pointer in SQL.

A version's name is the hash of its LoRA tensors and config, so the same weights always get the
same name and a version directory never changes once written. Beside the weights a version keeps
the optimizer state the update reached (Adam's moments), so the next update after a restart or a
rollback continues exactly as the harness's uninterrupted stream would.

Lineages and pointers are per tenant: a tenant's versions are its rows in ``adapter_versions``
(the weights directory is shared by content, never by lineage), and its active version is its row
in ``service_state``; activating (a swap or a rollback) is a compare-and-set of that pointer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import ACTIVE_ADAPTER_KEY, AdapterVersionRecord, get_state, set_state, utcnow
from training.lora import LoraSpec

WEIGHTS = "adapter.safetensors"
OPTIMIZER = "optimizer.safetensors"
CONFIG = "lora_config.json"


class UnknownAdapterVersion(LookupError):
    pass


class PrunedAdapterVersion(LookupError):
    """The version is recorded but its weights were pruned (outside the rollback window)."""


def version_of(tensors: dict[str, torch.Tensor], lora_config: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(lora_config, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:20]


def save_weights(
    root: Path, tensors: dict[str, torch.Tensor], lora_config: dict[str, Any],
    optimizer: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write a version directory (atomically; a no-op if that content already exists)."""
    version = version_of(tensors, lora_config)
    path = root / version
    if (path / WEIGHTS).is_file():
        return version
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
    (tmp / CONFIG).write_text(json.dumps(lora_config, sort_keys=True, default=str))
    files = [tmp / WEIGHTS, tmp / CONFIG]
    if optimizer:
        save_file({k: v.detach().cpu().contiguous() for k, v in optimizer.items()}, tmp / OPTIMIZER)
        files.append(tmp / OPTIMIZER)
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        tmp.rename(path)
    except OSError:  # written concurrently by another process: same content by construction
        shutil.rmtree(tmp, ignore_errors=True)
    return version


def has_weights(root: Path, version: str) -> bool:
    return (root / version / WEIGHTS).is_file()


def load_weights(root: Path, version: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = root / version
    if not has_weights(root, version):
        raise UnknownAdapterVersion(f"adapter version {version!r} has no weights in {root}")
    return load_file(path / WEIGHTS), json.loads((path / CONFIG).read_text())


def load_optimizer(root: Path, version: str) -> dict[str, torch.Tensor] | None:
    """The optimizer state saved with a version (None: none was saved, e.g. SGD or an initial version)."""
    path = root / version / OPTIMIZER
    return load_file(path) if path.is_file() else None


def peft_config(lora_config: dict[str, Any], model):
    """PEFT's ``LoraConfig`` of a stored version (a ``LoraSpec``; older versions stored PEFT's own fields)."""
    from peft import LoraConfig

    if "r" in lora_config:
        return LoraConfig(task_type="CAUSAL_LM", **lora_config)
    return LoraSpec.model_validate(lora_config).peft_config(model)


def record_version(
    session: Session, tenant: str, version: str, *, parent: str | None, kind: str, documents: list[str],
    metrics: dict[str, Any],
) -> AdapterVersionRecord:
    row = session.get(AdapterVersionRecord, (tenant, version))
    if row is None:
        row = AdapterVersionRecord(tenant_id=tenant, version=version, parent=parent, kind=kind, documents=documents,
                                   metrics=metrics, created_at=utcnow())
        session.add(row)
    return row


def active_version(session: Session, tenant: str) -> str | None:
    return get_state(session, tenant, ACTIVE_ADAPTER_KEY)


def rollback_target(session: Session, tenant: str, root: Path, version: str) -> AdapterVersionRecord:
    """The row of a version the live pointer may be moved back to: in the tenant's lineage, weights
    still on disk."""
    row = session.get(AdapterVersionRecord, (tenant, version))
    if row is None:
        raise UnknownAdapterVersion(f"no adapter version {version!r}")
    if not has_weights(root, version):
        raise PrunedAdapterVersion(f"adapter version {version!r} is outside the rollback window: "
                                   "its weights were pruned")
    return row


def activate(session: Session, tenant: str, version: str, expected: str | None | object = ...) -> bool:
    """Point the tenant's live adapter at ``version`` (inside the caller's write transaction). With
    ``expected``, only if the pointer still holds that value (a worker's swap loses to a concurrent
    rollback)."""
    if session.get(AdapterVersionRecord, (tenant, version)) is None:
        raise UnknownAdapterVersion(f"no adapter version {version!r}")
    if expected is not ... and active_version(session, tenant) != expected:
        return False
    set_state(session, tenant, ACTIVE_ADAPTER_KEY, version)
    return True


def list_versions(session: Session, tenant: str) -> list[AdapterVersionRecord]:
    return list(session.scalars(select(AdapterVersionRecord).where(AdapterVersionRecord.tenant_id == tenant)
                                .order_by(AdapterVersionRecord.created_at)))


def prune(session: Session, root: Path, keep: int) -> list[str]:
    """Delete the weight directories no tenant still protects: each tenant keeps its ``keep`` newest
    versions, its active one and its initial one (rebuilds replay from it). The SQL rows stay, so
    lineage and ``absorbed_by`` still answer for pruned versions; only activating one is no
    longer possible."""
    # only versions still on disk are candidates: the query stays O(keep x tenants) however long the history
    on_disk = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else set()
    if len(on_disk) <= keep:
        return []
    rows = list(session.scalars(select(AdapterVersionRecord).where(AdapterVersionRecord.version.in_(on_disk))
                                .order_by(AdapterVersionRecord.created_at)))
    by_tenant: dict[str, list[AdapterVersionRecord]] = {}
    for row in rows:
        by_tenant.setdefault(row.tenant_id, []).append(row)
    protected = set()
    for tenant, own in by_tenant.items():
        protected |= {active_version(session, tenant), *(r.version for r in own if r.kind == "initial"),
                      *(r.version for r in own[-keep:])}
    pruned = sorted({r.version for r in rows} - protected)
    for version in pruned:
        shutil.rmtree(root / version, ignore_errors=True)
    return pruned


def lineage(session: Session, tenant: str, version: str | None) -> list[AdapterVersionRecord]:
    """The version and its ancestors in the tenant's lineage, newest first."""
    out, seen = [], set()
    while version is not None and version not in seen:
        seen.add(version)
        row = session.get(AdapterVersionRecord, (tenant, version))
        if row is None:
            break
        out.append(row)
        version = row.parent
    return out


def absorbed_by(session: Session, tenant: str, doc_id: str, version: str | None) -> bool:
    """Whether ``version`` (e.g. the tenant's live one) carries an update made from this document."""
    return any(doc_id in (row.documents or []) for row in lineage(session, tenant, version))

"""The artifact registry: trained artifacts as immutable, content-addressed versions in SQL, with
lineage, metrics and one active pointer per kind (rollback is a pointer flip).

It lives in ``training`` because both sides write it: the service registers the shipped /
configured artifacts at start and flips pointers (``POST /artifacts/{id}/activate``); the retrain
job (``python -m training.retrain``), which never imports ``service``, registers what it trained.
The tables are SQLAlchemy Core definitions; the service adds them to its metadata and its Alembic
migration ``0004`` creates them.

Two pointers per kind: ``active_id`` is what the operator asked for, ``serving_id`` what answers
use now. For most kinds they move together; for ``mac`` the worker first writes the memory bank of
the new artifact in the background (``progress``) and then moves ``serving_id`` in one update, so
answers never read a half-written bank.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, Column, Engine, ForeignKey, MetaData, String, Table, Text, create_engine, event, insert, select,
    update,
)
from sqlalchemy.exc import IntegrityError

from training.artifacts import MANIFEST, WEIGHTS, read_manifest
from training.sql_types import UTCDateTime

metadata = MetaData()

artifacts_table = Table(
    "artifacts", metadata,
    Column("id", String(64), primary_key=True, doc="sha256 of kind, base-model hash, config and weights"),
    Column("kind", String(32), nullable=False, index=True),
    Column("path", Text, nullable=False, doc="the artifact directory, as every process of the deployment sees it"),
    Column("parent", String(64), doc="the artifact this one was trained from"),
    Column("source", String(32), nullable=False, doc="shipped | configured | retrain"),
    Column("base_model", String(500)),
    Column("metrics", JSON),
    Column("created_at", UTCDateTime(), nullable=False),
)

pointers_table = Table(
    "artifact_pointers", metadata,
    Column("kind", String(32), primary_key=True),
    Column("active_id", String(64), ForeignKey("artifacts.id"), nullable=False, doc="what the operator activated"),
    Column("serving_id", String(64), ForeignKey("artifacts.id"), nullable=False, doc="what answers use now"),
    Column("progress", JSON, doc="switch in progress: {'target', 'done', 'total', 'started_at'}"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

LIVE_KINDS = ("mac",)  # kinds a running deployment switches without a restart


class RegistryError(LookupError):
    """An unknown artifact, or one that cannot be activated."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def open_engine(url: str) -> Engine:
    """An engine for a process outside the service (the retrain job): on SQLite it waits for the
    service's write lock instead of failing at once."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _busy_timeout(dbapi_conn, _record):
            dbapi_conn.execute("PRAGMA busy_timeout=30000")
    return engine


def artifact_id(path: str | Path) -> str:
    """The content address of an artifact: what the weights are and what they are for (kind, base
    model fingerprint, architecture config); never where, when or by which command they were made."""
    manifest = read_manifest(path)
    digest = hashlib.sha256()
    head = {"kind": manifest.kind, "base": manifest.base_model_config_hash,
            "config": {k: v for k, v in manifest.config.items() if k != "stored_dtype"}}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    with open(Path(path) / WEIGHTS, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def store_artifact(src: str | Path, store: str | Path) -> tuple[str, Path]:
    """Copy an artifact directory into the content-addressed store ``<store>/<kind>/<id>`` (a no-op
    when that content is there) and return its id and path: the place the API and the worker read
    it from (a volume they share)."""
    ident = artifact_id(src)
    kind = read_manifest(src).kind
    dst = Path(store) / kind / ident
    if (dst / MANIFEST).is_file():
        return ident, dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ident[:12]}-", dir=dst.parent))
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    tmp.chmod(0o755)
    try:
        tmp.rename(dst)
    except OSError:  # stored concurrently: same content by construction
        shutil.rmtree(tmp, ignore_errors=True)
    return ident, dst


def register(engine: Engine, path: str | Path, *, source: str, parent: str | None = None,
             metrics: dict[str, Any] | None = None, activate_if_none: bool = False) -> str:
    """Record the artifact at ``path`` (idempotent: the same content keeps its first row) and return
    its id; with ``activate_if_none`` it becomes the active and serving one of its kind when the
    kind has no pointer yet (the initial version)."""
    path = Path(path).resolve()
    manifest = read_manifest(path)
    ident = artifact_id(path)
    row = {"id": ident, "kind": manifest.kind, "path": str(path), "parent": parent, "source": source,
           "base_model": manifest.base_model, "metrics": metrics if metrics is not None else manifest.metrics,
           "created_at": _now()}
    for attempt in range(2):  # two processes starting at once: the loser of an insert race retries
        try:
            with engine.begin() as conn:
                if conn.execute(select(artifacts_table.c.id).where(artifacts_table.c.id == ident)).first() is None:
                    conn.execute(insert(artifacts_table).values(**row))
                if activate_if_none and _pointer(conn, manifest.kind) is None:
                    conn.execute(insert(pointers_table).values(kind=manifest.kind, active_id=ident, serving_id=ident,
                                                               progress=None, updated_at=_now()))
            return ident
        except IntegrityError:
            if attempt:
                raise
    return ident


def _pointer(conn, kind: str) -> dict | None:
    row = conn.execute(select(pointers_table).where(pointers_table.c.kind == kind)).mappings().first()
    return dict(row) if row is not None else None


def pointer(engine: Engine, kind: str) -> dict | None:
    """``{'kind', 'active_id', 'serving_id', 'progress', 'updated_at'}`` of a kind, or None."""
    with engine.connect() as conn:
        return _pointer(conn, kind)


def pointers(engine: Engine) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["kind"]: dict(r) for r in conn.execute(select(pointers_table)).mappings()}


def get(engine: Engine, ident: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(select(artifacts_table).where(artifacts_table.c.id == ident)).mappings().first()
    return dict(row) if row is not None else None


def list_artifacts(engine: Engine, kind: str | None = None) -> list[dict]:
    query = select(artifacts_table).order_by(artifacts_table.c.created_at, artifacts_table.c.id)
    if kind is not None:
        query = query.where(artifacts_table.c.kind == kind)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def activate(engine: Engine, ident: str) -> dict:
    """Point the artifact's kind at ``ident`` (a roll forward or a rollback). Kinds switched by the
    worker in the background (``mac``) keep serving the old version until the switch completes;
    the others switch at once. Returns the new pointer."""
    row = get(engine, ident)
    if row is None:
        raise RegistryError(f"no artifact {ident!r}")
    if row["kind"] not in LIVE_KINDS:
        raise RegistryError(f"artifacts of kind {row['kind']!r} are read once at start: set it in the "
                            f"configuration and restart (live switching: {', '.join(LIVE_KINDS)})")
    if not (Path(row["path"]) / MANIFEST).is_file():
        raise RegistryError(f"artifact {ident} is registered at {row['path']}, which no longer holds it")
    with engine.begin() as conn:
        current = _pointer(conn, row["kind"])
        if current is None:
            conn.execute(insert(pointers_table).values(kind=row["kind"], active_id=ident, serving_id=ident,
                                                       progress=None, updated_at=_now()))
        else:
            progress = None if current["serving_id"] == ident else {"target": ident, "done": 0, "total": None}
            conn.execute(update(pointers_table).where(pointers_table.c.kind == row["kind"])
                         .values(active_id=ident, progress=progress, updated_at=_now()))
        return _pointer(conn, row["kind"])


def set_progress(engine: Engine, kind: str, target: str, done: int, total: int) -> bool:
    """Record the background switch's progress (only while ``target`` is still the active one)."""
    with engine.begin() as conn:
        result = conn.execute(update(pointers_table).where(pointers_table.c.kind == kind,
                                                           pointers_table.c.active_id == target)
                              .values(progress={"target": target, "done": done, "total": total}))
        return result.rowcount == 1


def complete_switch(engine: Engine, kind: str, target: str) -> bool:
    """Make ``target`` the serving artifact, in one update, if it is still the active one."""
    with engine.begin() as conn:
        result = conn.execute(update(pointers_table).where(pointers_table.c.kind == kind,
                                                           pointers_table.c.active_id == target)
                              .values(serving_id=target, progress=None, updated_at=_now()))
        return result.rowcount == 1


def default_store() -> Path:
    """Where the retrain job stores artifacts when not told: ``$FRESHLM_DATA_DIR/artifacts``."""
    return Path(os.environ.get("FRESHLM_DATA_DIR", "var")).expanduser().resolve() / "artifacts"

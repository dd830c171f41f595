"""SQL persistence (SQLAlchemy 2): tenants and their API keys, documents, adapter versions, and
small per-tenant state.

The schema is owned by the Alembic migrations in ``service/migrations``; these classes are the
Python view of it. A document is durable once its row is committed, which happens before the
API answers 202. Every row of tenant data carries its ``tenant_id`` in the primary key: the same
document id or adapter version can exist in two tenants without either seeing the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON, Boolean, Engine, Float, ForeignKey, Index, Integer, String, Text, create_engine,
    event, select, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from training import artifact_registry
from training.sql_types import UTCDateTime

DOCUMENT_STATUSES = ("pending", "ingested", "failed", "deleted")
DEFAULT_TENANT = "default"  # owns every row written before tenants existed, and serves the open mode
TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"  # safe inside Redis key hash tags and URLs
# service_state keys (per tenant) shared by the API and the worker; an artifact registry's
# "active artifact of a kind" pointers fit the same (tenant, key) rows
ACTIVE_ADAPTER_KEY = "active_adapter"
REBUILD_ADAPTER_KEY = "adapter_rebuild_requested"
REBUILD_MEMORY_KEY = "memory_rebuild_requested"


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def content_hash(text: str, title: str | None, source: str | None, published_at: str | None) -> str:
    """Identity of a document's content, to tell a harmless re-post from a conflicting one."""
    parts = [text, title or "", source or "", published_at or ""]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class TenantRecord(Base):
    """A tenant: its documents, retrieval index, memory entries and adapter lineage are its own."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKeyRecord(Base):
    """An API key of a tenant, stored as its SHA-256 (keys are 256-bit random strings: a fast hash
    is enough, and the lookup by hash needs no per-key comparison). ``role``: user or admin."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, doc="public id, shown in listings")
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class DocumentRecord(Base):
    """One posted document and where it is in the ingest pipeline.

    ``claimed_by`` / ``claim_token`` / ``lease_until`` are the worker's crash-safe claim: a row
    stays ``pending`` until its work is committed, so a killed worker leaves it to be claimed again.
    """

    __tablename__ = "documents"

    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(String(500))
    source: Mapped[str | None] = mapped_column(String(500))
    published_at: Mapped[str | None] = mapped_column(String(40))
    content_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    failure_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claim_token: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    memory_written: Mapped[bool] = mapped_column(Boolean, default=False)
    adapter_version: Mapped[str | None] = mapped_column(String(64), doc="version whose update absorbed it")
    adapter_note: Mapped[str | None] = mapped_column(Text, doc="why no adapter update was kept")
    ingest_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ingested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_documents_status_created", "status", "created_at"),
                      Index("ix_documents_tenant_status_created", "tenant_id", "status", "created_at"))


class AdapterVersionRecord(Base):
    """A version in a tenant's adapter lineage. Its weights live in ``adapters/<version>/``:
    content-addressed, so two tenants whose updates produced the same weights share the files,
    never the lineage."""

    __tablename__ = "adapter_versions"

    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), doc="initial | update | rebuild")
    documents: Mapped[list[str]] = mapped_column(JSON, default=list, doc="ids absorbed by this step")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# The artifact registry's tables (``training.artifact_registry``: the retrain job writes them too,
# without importing the service) are part of the schema the migrations own.
for _table in artifact_registry.metadata.tables.values():
    _table.to_metadata(Base.metadata)


class ServiceState(Base):
    """Small per-tenant key/value facts shared by the API and the worker (the active adapter
    pointer, rebuild requests)."""

    __tablename__ = "service_state"

    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


def make_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # durable, concurrent-reader friendly, erasing
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA secure_delete=ON")  # freed space is zeroed: erased text leaves the file
            cur.close()
            dbapi_conn.isolation_level = None  # transactions are begun by the listener below

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")
    return engine


@dataclass(frozen=True)
class Database:
    """The engine and its two kinds of session.

    On SQLite (WAL) a ``read`` transaction is deferred: it never waits for a writer. A ``write``
    transaction takes the write lock at BEGIN (IMMEDIATE), so one that reads before it writes
    (claims, idempotent inserts, compare-and-set of a pointer) never fails with
    SQLITE_BUSY_SNAPSHOT when another connection wrote meanwhile. On PostgreSQL both are plain
    transactions (claims lock their rows with ``FOR UPDATE SKIP LOCKED``)."""

    engine: Engine
    read: sessionmaker[Session]
    write: sessionmaker[Session]

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str) -> Database:
    engine = make_engine(url)
    writer = engine.execution_options(sqlite_begin="IMMEDIATE") if engine.dialect.name == "sqlite" else engine
    return Database(engine, sessionmaker(engine, expire_on_commit=False), sessionmaker(writer, expire_on_commit=False))


def erase_deleted_text(db: Database) -> None:
    """Push erased text out of the files now rather than at the next checkpoint / vacuum: SQLite
    copies the WAL into the (secure-delete) database file and truncates the WAL; PostgreSQL
    vacuums the table, which prunes the dead row versions (heap and TOAST) that held the text.
    A reader holding an older snapshot delays it; the next checkpoint or autovacuum finishes it."""
    if db.engine.dialect.name == "sqlite":
        with db.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    elif db.engine.dialect.name == "postgresql":
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM documents"))


def get_state(session: Session, tenant: str, key: str) -> str | None:
    row = session.get(ServiceState, (tenant, key))
    return row.value if row is not None else None


def set_state(session: Session, tenant: str, key: str, value: str | None) -> None:
    row = session.get(ServiceState, (tenant, key))
    if row is None:
        session.add(ServiceState(tenant_id=tenant, key=key, value=value, updated_at=utcnow()))
    else:
        row.value = value
        row.updated_at = utcnow()


def tenants_with_state(session: Session, key: str) -> list[str]:
    """Tenants for which ``key`` is set (e.g. a rebuild was requested)."""
    return list(session.scalars(select(ServiceState.tenant_id).where(
        ServiceState.key == key, ServiceState.value.is_not(None)).order_by(ServiceState.tenant_id)))

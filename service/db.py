"""SQL persistence (SQLAlchemy 2): documents, adapter versions, and small service state.

The schema is owned by the Alembic migrations in ``service/migrations``; these classes are the
Python view of it. A document is durable once its row is committed, which happens before the
API answers 202.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Engine, TypeDecorator, Float, Index, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DOCUMENT_STATUSES = ("pending", "ingested", "failed", "deleted")
# service_state keys shared by the API and the worker
ACTIVE_ADAPTER_KEY = "active_adapter"
REBUILD_ADAPTER_KEY = "adapter_rebuild_requested"
REBUILD_MEMORY_KEY = "memory_rebuild_requested"


class UTCDateTime(TypeDecorator):
    """Timestamps are UTC and come back timezone-aware on every engine (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def content_hash(text: str, title: str | None, source: str | None, published_at: str | None) -> str:
    """Identity of a document's content, to tell a harmless re-post from a conflicting one."""
    parts = [text, title or "", source or "", published_at or ""]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class DocumentRecord(Base):
    """One posted document and where it is in the ingest pipeline.

    ``claimed_by`` / ``claim_token`` / ``lease_until`` are the worker's crash-safe claim: a row
    stays ``pending`` until its work is committed, so a killed worker leaves it to be claimed again.
    """

    __tablename__ = "documents"

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

    __table_args__ = (Index("ix_documents_status_created", "status", "created_at"),)


class AdapterVersionRecord(Base):
    """An immutable, content-addressed adapter version; its weights live in ``adapters/<version>/``."""

    __tablename__ = "adapter_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), doc="initial | update | rebuild")
    documents: Mapped[list[str]] = mapped_column(JSON, default=list, doc="ids absorbed by this step")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ServiceState(Base):
    """Small key/value facts shared by the API and the worker (the active adapter pointer...)."""

    __tablename__ = "service_state"

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


def make_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # durable and concurrent-reader friendly
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # take the write lock at BEGIN: a read-then-write transaction (claims, idempotent
            # inserts) never fails with SQLITE_BUSY_SNAPSHOT when another process wrote meanwhile
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def get_state(session: Session, key: str) -> str | None:
    row = session.get(ServiceState, key)
    return row.value if row is not None else None


def set_state(session: Session, key: str, value: str | None) -> None:
    row = session.get(ServiceState, key)
    if row is None:
        session.add(ServiceState(key=key, value=value, updated_at=utcnow()))
    else:
        row.value = value
        row.updated_at = utcnow()


def corpus_version(session: Session) -> tuple:
    """Changes whenever a document becomes answerable or is deleted (rebuild the BM25 index)."""
    count, newest, deleted = session.execute(
        select(func.count(DocumentRecord.id), func.max(DocumentRecord.ingested_at), func.max(DocumentRecord.deleted_at))
        .where(DocumentRecord.status.in_(("ingested", "deleted")))
    ).one()
    return int(count), newest, deleted

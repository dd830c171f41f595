"""Where the retrain job reads documents: the service's database (read-only, through SQLAlchemy,
without importing the service) or a JSONL export (``training.data.jsonl`` format)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import create_engine, event, text

from training.data.jsonl import load_jsonl_dataset
from training.types import Document


def read_only_engine(url: str):
    """An engine whose connections refuse writes: SQLite ``query_only``, PostgreSQL read-only
    transactions. The job never changes the service's documents."""
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        if engine.dialect.name == "sqlite":
            cur.execute("PRAGMA query_only=ON")
        elif engine.dialect.name == "postgresql":
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        cur.close()
    return engine


def documents_from_database(url: str, tenant: str | None = None, limit: int | None = None) -> list[Document]:
    """Ingested documents (oldest first), optionally one tenant's; ids are ``tenant/id`` when
    several tenants are read, so equal ids of two tenants stay apart."""
    engine = read_only_engine(url)
    query = "SELECT tenant_id, id, text, title, published_at FROM documents WHERE status = 'ingested'"
    params: dict = {}
    if tenant is not None:
        query += " AND tenant_id = :tenant"
        params["tenant"] = tenant
    query += " ORDER BY created_at, tenant_id, id"
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(query), params).all()
    finally:
        engine.dispose()
    docs = [Document(id=r.id if tenant else f"{r.tenant_id}/{r.id}", text=r.text, title=r.title,
                     published_at=r.published_at) for r in rows if r.text and r.text.strip()]
    return docs[:limit] if limit is not None else docs


def documents_from_jsonl(path: str | Path, limit: int | None = None) -> list[Document]:
    docs = load_jsonl_dataset(path).documents
    return docs[:limit] if limit is not None else docs


def held_out(doc: Document, fraction: float) -> bool:
    """A stable split by id: a document stays on its side across runs (and resumes)."""
    bucket = int(hashlib.sha256(doc.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction

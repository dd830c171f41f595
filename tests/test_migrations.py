"""Alembic migrations from an empty database, on SQLite and on a real PostgreSQL server."""

from sqlalchemy import inspect

from service.db import Base, make_engine
from service.migrate import alembic_config, current_revision, head_revision, upgrade_database


def _check_upgrade_from_empty(url: str) -> None:
    engine = make_engine(url)
    try:
        assert current_revision(engine) is None
        assert upgrade_database(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables and "alembic_version" in tables
        # the migrations create exactly the columns the models declare
        for name, table in Base.metadata.tables.items():
            assert {c["name"] for c in inspect(engine).get_columns(name)} == set(table.columns.keys()), name
        assert upgrade_database(engine) == head_revision()  # idempotent
        # and the schema can go all the way down again
        from alembic import command

        config = alembic_config(url)
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_migrations_on_sqlite(tmp_path):
    _check_upgrade_from_empty(f"sqlite:///{tmp_path / 'm.db'}")


def test_migrations_on_postgresql(postgres_url):
    _check_upgrade_from_empty(postgres_url)


def _check_tenants_migration(url: str) -> None:
    """Rows of a database at 0002 go to the default tenant; the tenant is then part of every key;
    the downgrade refuses to fold other tenants into one."""
    import pytest
    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(url)
    config = alembic_config(url)
    try:
        command.upgrade(config, "0002")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO documents (id, text, content_hash, status, created_at, attempts, memory_written) "
                              "VALUES ('d-1', 'Old news.', 'h', 'ingested', '2026-01-02 03:04:05', 1, false)"))
            conn.execute(text("INSERT INTO adapter_versions VALUES ('v1', NULL, 'initial', '[]', '{}', '2026-01-02 03:04:05')"))
            conn.execute(text("INSERT INTO service_state VALUES ('active_adapter', 'v1', '2026-01-02 03:04:05')"))
        assert upgrade_database(engine) == head_revision()
        with engine.begin() as conn:
            for table in ("documents", "adapter_versions", "service_state"):
                assert conn.execute(text(f"SELECT DISTINCT tenant_id FROM {table}")).scalars().all() == ["default"]
            assert conn.execute(text("SELECT id FROM tenants")).scalars().all() == ["default"]
            conn.execute(text("INSERT INTO tenants VALUES ('acme', NULL, '2026-01-03 00:00:00')"))
            # the same document id in another tenant is another document
            conn.execute(text("INSERT INTO documents (tenant_id, id, text, content_hash, status, created_at, attempts, "
                              "memory_written) VALUES ('acme', 'd-1', 'Other.', 'h2', 'pending', '2026-01-03', 0, false)"))
        with pytest.raises(IntegrityError), engine.begin() as conn:  # but not twice in one tenant
            conn.execute(text("INSERT INTO documents (tenant_id, id, text, content_hash, status, created_at, attempts, "
                              "memory_written) VALUES ('acme', 'd-1', 'Again.', 'h3', 'pending', '2026-01-03', 0, false)"))
        with pytest.raises(RuntimeError, match="tenants besides 'default'"):
            command.downgrade(config, "0002")
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM documents WHERE tenant_id = 'acme'"))
            conn.execute(text("DELETE FROM tenants WHERE id = 'acme'"))
        command.downgrade(config, "0002")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT id, text FROM documents")).all() == [("d-1", "Old news.")]
    finally:
        engine.dispose()


def test_tenants_migration_on_sqlite(tmp_path):
    _check_tenants_migration(f"sqlite:///{tmp_path / 't.db'}")


def test_tenants_migration_on_postgresql(postgres_url):
    _check_tenants_migration(postgres_url)


def test_models_and_migrations_agree():
    """Autogenerate finds nothing to do: the models have no change without a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine("sqlite://")
    with engine.begin() as conn:
        alembic = alembic_config("sqlite://")
        alembic.attributes["connection"] = conn
        from alembic import command

        command.upgrade(alembic, "head")
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff


def test_a_database_of_the_first_version_is_upgraded_in_place(tmp_path):
    """``create_all`` made the first schema, without Alembic: its documents survive the upgrade."""
    from sqlalchemy import text

    engine = make_engine(f"sqlite:///{tmp_path / 'legacy.db'}")
    with engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE documents (id VARCHAR(200) PRIMARY KEY, text TEXT NOT NULL, title VARCHAR(500), "
            "source VARCHAR(500), published_at VARCHAR(40), content_hash VARCHAR(64) NOT NULL, "
            "status VARCHAR(16) NOT NULL, created_at DATETIME NOT NULL)"))
        conn.execute(text("INSERT INTO documents VALUES ('old-1', 'Old news.', NULL, NULL, NULL, 'h', 'ingested', "
                          "'2026-01-02 03:04:05.000000')"))
    assert upgrade_database(engine) == head_revision()
    from service.db import DEFAULT_TENANT, DocumentRecord, open_database

    db = open_database(f"sqlite:///{tmp_path / 'legacy.db'}")
    with db.read() as session:
        doc = session.get(DocumentRecord, (DEFAULT_TENANT, "old-1"))  # rows from before tenants: the default one
        assert doc.text == "Old news." and doc.status == "ingested" and doc.attempts == 0
        assert doc.memory_written is False and doc.ingested_at is not None and doc.ingested_at.tzinfo is not None
    db.dispose()
    engine.dispose()


def test_backup_and_restore_with_pg_dump(postgres_url, tmp_path):
    """The ops guide's backup of PostgreSQL: ``pg_dump -Fc`` to a file, ``pg_restore --clean`` from
    it brings back rows deleted since, on the migrated schema (the same flags as the guide; the
    guide runs them in the postgres container)."""
    import subprocess

    from sqlalchemy import text

    from tests.postgres_server import pg_bin

    engine = make_engine(postgres_url)
    libpq = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        upgrade_database(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO documents (tenant_id, id, text, content_hash, status, created_at, attempts, "
                              "memory_written) VALUES ('default', 'd-1', 'Kept news.', 'h', 'ingested', "
                              "'2026-01-02 03:04:05', 1, false)"))
        dump = tmp_path / "freshlm.dump"
        with open(dump, "wb") as out:
            subprocess.run([pg_bin("pg_dump"), "-Fc", "-d", libpq], stdout=out, check=True, timeout=120)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM documents"))
        engine.dispose()
        with open(dump, "rb") as dump_in:
            subprocess.run([pg_bin("pg_restore"), "-d", libpq, "--clean"], stdin=dump_in, check=True, timeout=120)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT id, text FROM documents")).all() == [("d-1", "Kept news.")]
        assert current_revision(engine) == head_revision()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:  # the erasure note's
            conn.execute(text("VACUUM FULL documents"))  # rewrite of the table (VACUUM cannot run in a transaction)
            assert conn.execute(text("SELECT id FROM documents")).all() == [("d-1",)]
    finally:
        engine.dispose()

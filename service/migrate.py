"""Schema migrations run from code (service start, worker start, tests) with Alembic.

The scripts live inside the package so an installed service can migrate without the repo's
``alembic.ini``; ``alembic upgrade head`` from the repo root uses the same scripts.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# A database made by the first service version (``create_all``, no ``alembic_version``) has
# exactly the schema of revision 0001: it is stamped there, then upgraded like any other.
LEGACY_REVISION = "0001"


def upgrade_database(engine: Engine) -> str:
    """Bring the schema to head (a no-op when it is there); returns the revision."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        tables = set(inspect(conn).get_table_names())
        if "documents" in tables and "alembic_version" not in tables:
            command.stamp(config, LEGACY_REVISION)
        command.upgrade(config, "head")
    return current_revision(engine)


def main(argv: list[str] | None = None) -> None:
    """``freshlm-migrate`` / ``python -m service.migrate``: bring the configured database
    (``FRESHLM_DATABASE_URL``) to the head revision and exit; the compose file's one-shot
    ``migrate`` service, which the API and the worker wait for."""
    import argparse

    from service.core.config import Settings
    from service.db import make_engine

    parser = argparse.ArgumentParser(prog="freshlm-migrate", description=main.__doc__.split(";")[0])
    parser.parse_args(argv)
    engine = make_engine(Settings().sqlalchemy_url)
    try:
        print(f"database schema at revision {upgrade_database(engine)}")
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()

"""Tenants: a tenants table with the default tenant, hashed API keys, and the tenant in the primary
key of documents, adapter versions and service state (every existing row goes to the default
tenant).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DEFAULT = "default"
TZ = sa.DateTime(timezone=True)
# table -> its primary key column before tenants (and that column's type)
TENANT_TABLES = {"documents": ("id", sa.String(200)), "adapter_versions": ("version", sa.String(64)),
                 "service_state": ("key", sa.String(100))}


def _set_primary_key(table: str, columns: list[str]) -> None:
    """Replace the table's primary key. PostgreSQL alters it in place (the key keeps PostgreSQL's
    default name); SQLite cannot, so the table is rebuilt (batch "recreate") from its reflected
    definition with the new key in place of the old one."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"{table}_pkey", type_="primary")
            batch.create_primary_key(f"{table}_pkey", columns)
        return
    current = sa.Table(table, sa.MetaData(), autoload_with=bind)
    rekeyed = sa.Table(
        table, sa.MetaData(),
        *[sa.Column(c.name, c.type, nullable=c.nullable and c.name not in columns, server_default=c.server_default)
          for c in current.columns],
        sa.PrimaryKeyConstraint(*columns, name=f"{table}_pkey"),
        *[sa.ForeignKeyConstraint([c.parent.name for c in fk.elements], [c.target_fullname for c in fk.elements],
                                  name=fk.name) for fk in current.foreign_key_constraints],
        *[sa.Index(i.name, *[c.name for c in i.columns], unique=i.unique) for i in current.indexes],
    )
    with op.batch_alter_table(table, recreate="always", copy_from=rekeyed):
        pass


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.bulk_insert(tenants, [{"id": DEFAULT, "name": "default tenant", "created_at": datetime.now(timezone.utc)}])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("revoked_at", TZ),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    for table, (key, _) in TENANT_TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(64), nullable=False, server_default=DEFAULT))
        _set_primary_key(table, ["tenant_id", key])
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tenant_id", server_default=None, existing_type=sa.String(64), existing_nullable=False)
            batch.create_foreign_key(f"fk_{table}_tenant", "tenants", ["tenant_id"], ["id"])
    op.create_index("ix_documents_tenant_status_created", "documents", ["tenant_id", "status", "created_at"])


def downgrade() -> None:
    others = op.get_bind().execute(sa.text("SELECT count(*) FROM tenants WHERE id != :d"), {"d": DEFAULT}).scalar()
    if others:
        raise RuntimeError(f"{others} tenants besides '{DEFAULT}' exist: a schema without tenants cannot hold them")
    op.drop_index("ix_documents_tenant_status_created", table_name="documents")
    for table, (key, _) in TENANT_TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_tenant", type_="foreignkey")
        _set_primary_key(table, [key])
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant_id")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")

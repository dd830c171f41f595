"""Documents with their ingest claim, adapter versions, service state.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "documents",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("title", sa.String(500)),
        sa.Column("source", sa.String(500)),
        sa.Column("published_at", sa.String(40)),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("claim_token", sa.String(64)),
        sa.Column("lease_until", TZ),
        sa.Column("memory_written", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("adapter_version", sa.String(64)),
        sa.Column("adapter_note", sa.Text()),
        sa.Column("ingest_seconds", sa.Float()),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("ingested_at", TZ),
        sa.Column("deleted_at", TZ),
    )
    op.create_index("ix_documents_status_created", "documents", ["status", "created_at"])
    op.create_table(
        "adapter_versions",
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("parent", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("documents", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "service_state",
        sa.Column("key", sa.String(100), primary_key=True),
        sa.Column("value", sa.Text()),
        sa.Column("updated_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("service_state")
    op.drop_table("adapter_versions")
    op.drop_index("ix_documents_status_created", table_name="documents")
    op.drop_table("documents")

"""The ingest pipeline: claim/lease and outcome columns on documents, adapter versions, state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
NEW_DOCUMENT_COLUMNS = [
    sa.Column("failure_reason", sa.Text()),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("claimed_by", sa.String(200)),
    sa.Column("claim_token", sa.String(64)),
    sa.Column("lease_until", TZ),
    sa.Column("memory_written", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("adapter_version", sa.String(64)),
    sa.Column("adapter_note", sa.Text()),
    sa.Column("ingest_seconds", sa.Float()),
    sa.Column("ingested_at", TZ),
    sa.Column("deleted_at", TZ),
]


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        for column in NEW_DOCUMENT_COLUMNS:
            batch.add_column(column.copy())
    # documents stored before the worker existed were answerable at once: keep them so
    op.execute("UPDATE documents SET ingested_at = created_at WHERE status = 'ingested'")
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
    with op.batch_alter_table("documents") as batch:
        for column in reversed(NEW_DOCUMENT_COLUMNS):
            batch.drop_column(column.name)

"""The artifact registry: content-addressed artifact versions (kind, path, lineage, metrics) and
one pointer per kind (active = asked for, serving = what answers use; ``training.artifact_registry``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("parent", sa.String(64)),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("base_model", sa.String(500)),
        sa.Column("metrics", sa.JSON()),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_artifacts_kind", "artifacts", ["kind"])
    op.create_table(
        "artifact_pointers",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("active_id", sa.String(64), sa.ForeignKey("artifacts.id"), nullable=False),
        sa.Column("serving_id", sa.String(64), sa.ForeignKey("artifacts.id"), nullable=False),
        sa.Column("progress", sa.JSON()),
        sa.Column("updated_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("artifact_pointers")
    op.drop_index("ix_artifacts_kind", table_name="artifacts")
    op.drop_table("artifacts")

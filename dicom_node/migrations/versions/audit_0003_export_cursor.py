"""The export cursor: per exporter, the id of the last audit event its repository took.

Revision ID: audit_0003
Revises: audit_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "audit_0003"
down_revision = "audit_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_export_cursors",
        sa.Column("exporter", sa.String(32), primary_key=True),
        sa.Column("last_id", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_export_cursors")

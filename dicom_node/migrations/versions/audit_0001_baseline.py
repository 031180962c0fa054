"""The audit store as the releases before the chain head was keyed created it.

Revision ID: audit_0001
Branch: audit
"""

import sqlalchemy as sa
from alembic import op

revision = "audit_0001"
down_revision = None
branch_labels = ("audit",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("event", sa.String(32), nullable=False, index=True),
        sa.Column("event_id", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), index=True),
        sa.Column("remote", sa.String(128)),
        sa.Column("pseudonym", sa.String(40), index=True),
        sa.Column("study_uid", sa.String(64), index=True),
        sa.Column("series_uid", sa.String(64)),
        sa.Column("sop_uid", sa.String(64)),
        sa.Column("job_id", sa.Integer),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_pseudonyms",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("pseudonym", sa.String(40), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("head_id", sa.Integer, nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("anchor_id", sa.Integer, nullable=False),
        sa.Column("anchor_hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("audit_chain", "audit_pseudonyms", "audit_events"):
        op.drop_table(table)

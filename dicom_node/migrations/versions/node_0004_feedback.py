"""Radiologists' feedback: one verdict (agree or disagree, with an optional reason) per finding of an
analysed instance, by a user, at a time. A job deleted by retention or erasure leaves its feedback
with no job id.

Revision ID: node_0004
Branch: node
"""

import sqlalchemy as sa
from alembic import op

revision = "node_0004"
down_revision = "node_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL"), index=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("feedback")

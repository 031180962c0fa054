"""Storage commitment: each delivery's last commitment request (transaction UID, time) and
how many were made.

Revision ID: node_0002
Branch: node
"""

import sqlalchemy as sa
from alembic import op

revision = "node_0002"
down_revision = "node_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as table:
        table.add_column(sa.Column("commit_transaction_uid", sa.String(64)))
        table.add_column(sa.Column("commit_requested_at", sa.DateTime(timezone=True)))
        table.add_column(sa.Column("commit_requests", sa.Integer, nullable=False, server_default="0"))
        table.create_index("ix_deliveries_commit_transaction_uid", ["commit_transaction_uid"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as table:
        table.drop_index("ix_deliveries_commit_transaction_uid")
        table.drop_column("commit_requests")
        table.drop_column("commit_requested_at")
        table.drop_column("commit_transaction_uid")

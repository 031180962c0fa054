"""Job leases: until when a running job belongs to the worker analysing it (renewed while it runs).

Revision ID: node_0003
Branch: node
"""

import sqlalchemy as sa
from alembic import op

revision = "node_0003"
down_revision = "node_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.add_column(sa.Column("lease_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.drop_column("lease_until")

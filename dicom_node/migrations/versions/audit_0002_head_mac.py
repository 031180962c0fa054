"""The chain head's keyed hash, ``audit_chain.head_mac``.

NULL after this upgrade: the audit trail keys the head when it next opens the store (it
holds the key; this revision does not), recording ``chain-head-keyed``.

Revision ID: audit_0002
Revises: audit_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "audit_0002"
down_revision = "audit_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_chain", sa.Column("head_mac", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("audit_chain") as batch:
        batch.drop_column("head_mac")

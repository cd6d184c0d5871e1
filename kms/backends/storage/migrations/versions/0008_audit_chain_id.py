"""Name the audit chain: audit_head.chain_id, the suffix of the label of the HSM data
object that anchors the chain (kms/services/audit_anchor.py). NULL until ``kms init``
anchors the chain; a server refuses audited operations while it is NULL.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_head") as batch:
        batch.add_column(sa.Column("chain_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_head") as batch:
        batch.drop_column("chain_id")

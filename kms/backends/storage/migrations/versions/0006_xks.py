"""Per-key policies of the XKS proxy API face.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "xks_key_policies",
        sa.Column("key_id", sa.String(64), sa.ForeignKey("keys.key_id"), primary_key=True),
        sa.Column("usage", sa.String(32), nullable=False),
        sa.Column("aws_principals", sa.Text, nullable=True),
        sa.Column("kms_operations", sa.Text, nullable=True),
        sa.Column("updated_at", sa.String(24), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("xks_key_policies")

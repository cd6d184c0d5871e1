"""Dual control: the sealed control policy, proposed changes and their signed decisions
(kms/services/changes.py).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_TIME = sa.String(24)  # "YYYY-MM-DDTHH:MM:SS.mmmZ", compares in time order


def upgrade() -> None:
    op.create_table(
        "control_policy",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("quorum", sa.Integer, nullable=False),
        sa.Column("required_groups", sa.Text, nullable=False),
        sa.Column("ttl_seconds", sa.Integer, nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_table(
        "changes",
        sa.Column("change_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("proposer", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_index("ix_changes_state", "changes", ["state"])
    op.create_table(
        "change_decisions",
        sa.Column(
            "change_id",
            sa.String(64),
            sa.ForeignKey("changes.change_id"),
            primary_key=True,
        ),
        sa.Column("custodian", sa.String(64), primary_key=True),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("recorded_at", _TIME, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("change_decisions")
    op.drop_index("ix_changes_state", "changes")
    op.drop_table("changes")
    op.drop_table("control_policy")

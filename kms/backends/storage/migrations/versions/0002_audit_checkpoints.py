"""Signed audit checkpoints, and where the chain head row tracks the last checkpoint and
the archived prefix.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
        sa.Column("prev_seq", _SEQ, nullable=False),
        sa.Column("record_hash", sa.String(64), nullable=False),
        sa.Column("time", sa.String(24), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(200), nullable=False),
    )
    with op.batch_alter_table("audit_head") as batch:
        batch.add_column(sa.Column("checkpoint_seq", _SEQ, nullable=False, server_default="0"))
        batch.add_column(sa.Column("archived_seq", _SEQ, nullable=False, server_default="0"))
    with op.batch_alter_table("audit_records") as batch:
        batch.add_column(sa.Column("v", sa.Integer, nullable=False, server_default="1"))
    op.create_index("ix_audit_time", "audit_records", ["time"])
    op.create_index("ix_audit_key", "audit_records", ["key_id"])
    op.create_index("ix_audit_principal", "audit_records", ["principal"])


def downgrade() -> None:
    raise NotImplementedError("the audit trail is never dropped by a migration")

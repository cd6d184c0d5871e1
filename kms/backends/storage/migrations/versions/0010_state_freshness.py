"""Freshness of sealed rows: the ``state_changes`` log (kms/services/state_index.py) and
the sealed state a format-2 checkpoint carries (kms/formats/checkpoint.py).

The HSM's state anchor is made by ``kms init`` / ``kms migrate`` once the schema is
current (a migration cannot reach the HSM); until then the server refuses sealed rows.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "state_changes",
        sa.Column("n", _SEQ, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(24), primary_key=True),
        sa.Column("ident", sa.String(200), primary_key=True),
        sa.Column("seal", sa.String(64), nullable=True),
    )
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.add_column(sa.Column("state_seq", _SEQ, nullable=True))
        batch.add_column(sa.Column("state_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.drop_column("state_sha256")
        batch.drop_column("state_seq")
    op.drop_table("state_changes")

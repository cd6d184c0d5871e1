"""Key lifecycle: rotation period, minimum decryption version, time of last rotation.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("rotation_period_days", sa.Integer, nullable=True))
        batch.add_column(
            sa.Column("min_decryption_version", sa.Integer, nullable=False, server_default="1")
        )
        batch.add_column(sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True))
    # Existing keys: the current version was made when its key_versions row was.
    op.execute(
        "UPDATE keys SET rotated_at = (SELECT v.created_at FROM key_versions v"
        " WHERE v.key_id = keys.key_id AND v.version = keys.current_version)"
    )


def downgrade() -> None:
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("rotated_at")
        batch.drop_column("min_decryption_version")
        batch.drop_column("rotation_period_days")

"""Principal lifecycle: disabled principals, ended dashboard sessions, token expiry, last
use and rotation (a token is rotated once) (kms/services/principals.py). The new sealed
fields enter a row's seal only once set, so every row sealed before keeps its seal.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("principals") as batch:
        batch.add_column(sa.Column("disabled_at", _WHEN, nullable=True))
        batch.add_column(sa.Column("sessions_since", _WHEN, nullable=True))
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("expires_at", _WHEN, nullable=True))
        batch.add_column(sa.Column("last_used_at", _WHEN, nullable=True))
        batch.add_column(sa.Column("rotated_at", _WHEN, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("rotated_at")
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
    with op.batch_alter_table("principals") as batch:
        batch.drop_column("sessions_since")
        batch.drop_column("disabled_at")

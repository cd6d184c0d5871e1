"""Seal the rows that grant or describe access: a ``seal`` column (kms/services/seals.py)
on principals, tokens, keys, key_versions, grants, sigv4_credentials and
xks_key_policies.

Existing rows are left NULL here (a migration cannot reach the HSM): a NULL seal is
refused at use, and ``kms init`` / ``kms migrate`` seal the rows that are still NULL once
the schema is current (kms/services/seal_upgrade.py).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TABLES = (
    "principals",
    "tokens",
    "keys",
    "key_versions",
    "grants",
    "sigv4_credentials",
    "xks_key_policies",
)


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("seal", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("seal")

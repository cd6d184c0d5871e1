"""Wrap mechanisms: each wrapped KEK (key versions, SigV4 credentials) records the key-wrap
mechanism that wrapped it, so a database outlives a change of HSM model (issue 20). Every
KEK wrapped so far was wrapped with CKM_AES_KEY_WRAP_PAD (kms/services/model.py
LEGACY_WRAP_MECHANISM), which the server default gives the existing rows. That value is
not in a row's seal (kms/services/seals.py), so every row sealed before keeps its seal.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# a mechanism name ("CKM_AES_KEY_WRAP_KWP") or a vendor constant ("0x80000171")
_MECHANISM = sa.String(32)
_LEGACY = "CKM_AES_KEY_WRAP_PAD"


def upgrade() -> None:
    for table in ("key_versions", "sigv4_credentials"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("wrap_mechanism", _MECHANISM, nullable=False, server_default=_LEGACY)
            )


def downgrade() -> None:
    for table in ("sigv4_credentials", "key_versions"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("wrap_mechanism")

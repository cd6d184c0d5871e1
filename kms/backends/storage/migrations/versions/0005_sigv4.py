"""SigV4 credentials (secrets sealed by the HSM) and the replay nonce table.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TIME = sa.String(24)


def upgrade() -> None:
    op.create_table(
        "sigv4_credentials",
        sa.Column("access_key_id", sa.String(32), primary_key=True),
        sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("sealed_secret", sa.LargeBinary, nullable=False),
        sa.Column("wrapped_kek", sa.LargeBinary, nullable=False),
        sa.Column("root_label", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_index("ix_sigv4_principal", "sigv4_credentials", ["principal_id"])
    op.create_table(
        "sigv4_nonces",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("expires_at", _TIME, nullable=False),
    )
    op.create_index("ix_sigv4_nonce_expiry", "sigv4_nonces", ["expires_at"])


def downgrade() -> None:
    op.drop_table("sigv4_nonces")
    op.drop_table("sigv4_credentials")

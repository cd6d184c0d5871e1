"""Initial schema: principals, tokens, keys, aliases, key versions, grants, audit chain.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("deletion_date", _TS, nullable=True),
    )
    op.create_table(
        "aliases",
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column(
            "key_id", sa.String(64), sa.ForeignKey("keys.key_id"), nullable=False, unique=True
        ),
    )
    op.create_table(
        "key_versions",
        sa.Column("key_id", sa.String(64), sa.ForeignKey("keys.key_id"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("wrapped_kek", sa.LargeBinary, nullable=False),
        sa.Column("root_label", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "grants",
        sa.Column("key_id", sa.String(64), sa.ForeignKey("keys.key_id"), primary_key=True),
        sa.Column("principal_id", sa.Integer, sa.ForeignKey("principals.id"), primary_key=True),
        sa.Column("operations", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_records",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
        sa.Column("time", sa.String(24), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(64), nullable=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("key_version", sa.Integer, nullable=True),
        sa.Column("context_sha256", sa.String(64), nullable=True),
        sa.Column("justification", sa.String(32), nullable=True),
        sa.Column("case_id", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.String(256), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("prev_hash", name="uq_audit_prev_hash"),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", _SEQ, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '" + "0" * 64 + "')")


def downgrade() -> None:
    raise NotImplementedError("the audit trail is never dropped by a migration")

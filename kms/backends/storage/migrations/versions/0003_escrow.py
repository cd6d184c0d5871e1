"""Escrow: custodians, cases, signed decisions, the notification outbox, per-key escrow
policy and per-grant justifications.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TIME = sa.String(24)  # "YYYY-MM-DDTHH:MM:SS.mmmZ", compares in time order


def upgrade() -> None:
    op.create_table(
        "custodians",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("custodian_group", sa.String(64), nullable=False),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_table(
        "escrow_cases",
        sa.Column("case_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("requester", sa.String(64), nullable=False),
        sa.Column("legal_basis", sa.Text, nullable=False),
        sa.Column("reference", sa.String(200), nullable=False),
        sa.Column("justification", sa.String(32), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),  # JSON, see kms/formats/escrow.py
        sa.Column("max_unwraps", sa.Integer, nullable=False),
        sa.Column("unwraps_used", sa.Integer, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("active_from", _TIME, nullable=True),
        sa.Column("mac", sa.String(64), nullable=False),
    )
    op.create_table(
        "escrow_decisions",
        sa.Column(
            "case_id", sa.String(64), sa.ForeignKey("escrow_cases.case_id"), primary_key=True
        ),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("custodian", sa.String(64), primary_key=True),
        sa.Column("decision", sa.String(8), primary_key=True),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("recorded_at", _TIME, nullable=False),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("last_error", sa.String(200), nullable=True),
    )
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("escrow_policy", sa.Text, nullable=True))
    with op.batch_alter_table("grants") as batch:
        batch.add_column(
            sa.Column(
                "justifications",
                sa.String(200),
                nullable=False,
                server_default="service_processing",
            )
        )


def downgrade() -> None:
    raise NotImplementedError("escrow records are never dropped by a migration")

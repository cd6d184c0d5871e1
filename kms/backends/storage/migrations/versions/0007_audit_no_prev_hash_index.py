"""Drop the unique index on audit_records.prev_hash.

The chain stays linear without it: appends are serialised (the writer lock, the head row
read FOR UPDATE) and ``seq`` is the primary key, so two records can never follow the
same predecessor. The index cost a random B-tree write per record (hashes are
uniformly distributed), which dominated the commit of large batches. On SQLite the table
is copied once (batch mode); on PostgreSQL the constraint is dropped in place.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.drop_constraint("uq_audit_prev_hash", type_="unique")


def downgrade() -> None:
    with op.batch_alter_table("audit_records") as batch:
        batch.create_unique_constraint("uq_audit_prev_hash", ["prev_hash"])

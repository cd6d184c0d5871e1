"""Table definitions (the shape migrations produce; migrations are the source of truth
for existing databases, and a test checks they agree)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

principals = Table(
    "principals",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Bearer tokens: only the SHA-256 of the token is stored.
tokens = Table(
    "tokens",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

keys = Table(
    "keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("description", Text, nullable=False),
    Column("state", String(24), nullable=False),
    Column("current_version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("deletion_date", DateTime(timezone=True), nullable=True),
)

aliases = Table(
    "aliases",
    metadata,
    Column("alias", String(64), primary_key=True),
    Column("key_id", String(64), ForeignKey("keys.key_id"), nullable=False, unique=True),
)

# KEK versions: material wrapped under the HSM root key named by root_label.
key_versions = Table(
    "key_versions",
    metadata,
    Column("key_id", String(64), ForeignKey("keys.key_id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("wrapped_kek", LargeBinary, nullable=False),
    Column("root_label", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

grants = Table(
    "grants",
    metadata,
    Column("key_id", String(64), ForeignKey("keys.key_id"), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), primary_key=True),
    Column("operations", String(64), nullable=False),  # comma-separated, sorted
)

audit_records = Table(
    "audit_records",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    ),
    Column("time", String(24), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("principal", String(64), nullable=True),
    Column("operation", String(32), nullable=False),
    Column("key_id", String(64), nullable=True),
    Column("key_version", Integer, nullable=True),
    Column("context_sha256", String(64), nullable=True),
    Column("justification", String(32), nullable=True),
    Column("case_id", String(64), nullable=True),
    Column("outcome", String(32), nullable=False),
    Column("detail", String(256), nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    UniqueConstraint("prev_hash", name="uq_audit_prev_hash"),
)

# One row: the chain head. Updating it takes a row lock, which serialises appenders on
# every database (SQLite additionally serialises writers with BEGIN IMMEDIATE).
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("hash", String(64), nullable=False),
)

"""Table definitions (the shape migrations produce; migrations are the source of truth
for existing databases, and a test checks they agree)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from kms.services.model import LEGACY_WRAP_MECHANISM

metadata = MetaData()
_SEQ = BigInteger().with_variant(Integer, "sqlite")

principals = Table(
    "principals",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("seal", String(64), nullable=True),  # kms/services/seals.py; NULL: refused
    Column("disabled_at", DateTime(timezone=True), nullable=True),  # sealed
    Column("sessions_since", DateTime(timezone=True), nullable=True),  # sealed
)

# Bearer tokens: only the SHA-256 of the token is stored.
tokens = Table(
    "tokens",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("seal", String(64), nullable=True),  # kms/services/seals.py; NULL: refused
    Column("expires_at", DateTime(timezone=True), nullable=True),  # sealed; NULL: never
    Column("last_used_at", DateTime(timezone=True), nullable=True),  # not sealed
    Column("rotated_at", DateTime(timezone=True), nullable=True),  # sealed; NULL: not yet
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
    Column("escrow_policy", Text, nullable=True),  # JSON EscrowPolicy, None: the default
    Column("rotation_period_days", Integer, nullable=True),  # None: no scheduled rotation
    Column("min_decryption_version", Integer, nullable=False, server_default="1"),
    Column("rotated_at", DateTime(timezone=True), nullable=True),  # current version made
    Column("seal", String(64), nullable=True),  # kms/services/seals.py; NULL: refused
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
    Column("seal", String(64), nullable=True),  # kms/services/seals.py; NULL: refused
    # the key-wrap mechanism that wrapped wrapped_kek ("CKM_AES_KEY_WRAP_KWP", or a vendor
    # constant "0x80000171"); rows from before 0013: CKM_AES_KEY_WRAP_PAD. Sealed unless
    # it is that legacy value (kms/services/seals.py version_fields)
    Column("wrap_mechanism", String(32), nullable=False, server_default=LEGACY_WRAP_MECHANISM),
)

grants = Table(
    "grants",
    metadata,
    Column("key_id", String(64), ForeignKey("keys.key_id"), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), primary_key=True),
    Column("operations", String(64), nullable=False),  # comma-separated, sorted
    # justification codes the grant allows, comma-separated
    Column("justifications", String(200), nullable=False, server_default="service_processing"),
    Column("seal", String(64), nullable=True),  # kms/services/seals.py; NULL: refused
)

audit_records = Table(
    "audit_records",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=False),
    Column("v", Integer, nullable=False, server_default="1"),  # record format version
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
    # no unique index on prev_hash (dropped in 0007): seq is the key and appends are
    # serialised, so no two records share a predecessor
    Index("ix_audit_time", "time"),
    Index("ix_audit_key", "key_id"),
    Index("ix_audit_principal", "principal"),
)

# Signed checkpoints of the chain head (kms/formats/checkpoint.py); never deleted.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=False),
    Column("prev_seq", _SEQ, nullable=False),
    Column("record_hash", String(64), nullable=False),
    Column("time", String(24), nullable=False),
    Column("key_sha256", String(64), nullable=False),
    Column("signature", String(200), nullable=False),
    # format 2: the sealed state when signed (kms/formats/state.py); NULL in format 1
    Column("state_seq", _SEQ, nullable=True),
    Column("state_sha256", String(64), nullable=True),
)

# The log of changes to sealed rows (kms/services/state_index.py): one ``n`` per
# transaction that wrote any; ``seal`` NULL for a row deleted. The HSM's state anchor
# names the newest ``n`` and the digest of the sealed rows after it.
state_changes = Table(
    "state_changes",
    metadata,
    Column("n", _SEQ, primary_key=True, autoincrement=False),
    Column("kind", String(24), primary_key=True),
    Column("ident", String(200), primary_key=True),
    Column("seal", String(64), nullable=True),
)

# One row: the chain head. Updating it takes a row lock, which serialises appenders on
# every database (SQLite additionally serialises writers with BEGIN IMMEDIATE).
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", _SEQ, nullable=False),
    Column("hash", String(64), nullable=False),
    # seq of the newest checkpoint, and of the last record archived (removed) from here
    Column("checkpoint_seq", _SEQ, nullable=False, server_default="0"),
    Column("archived_seq", _SEQ, nullable=False, server_default="0"),
    # names the HSM object anchoring the chain (kms/services/audit_anchor.py)
    Column("chain_id", String(32), nullable=True),
)


# -- escrow (kms/services/escrow.py) ------------------------------------------------------
_TIME = String(24)  # "YYYY-MM-DDTHH:MM:SS.mmmZ", compares in time order

custodians = Table(
    "custodians",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("custodian_group", String(64), nullable=False),
    Column("public_key", LargeBinary, nullable=False),  # raw Ed25519 public key
    Column("state", String(16), nullable=False),  # active | revoked
    Column("created_at", _TIME, nullable=False),
    Column("mac", String(64), nullable=False),  # HSM HMAC of the row (services/escrow.py)
)

escrow_cases = Table(
    "escrow_cases",
    metadata,
    Column("case_id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("requester", String(64), nullable=False),
    Column("legal_basis", Text, nullable=False),
    Column("reference", String(200), nullable=False),
    Column("justification", String(32), nullable=False),
    Column("scope", Text, nullable=False),
    Column("max_unwraps", Integer, nullable=False),
    Column("unwraps_used", Integer, nullable=False),
    Column("expires_at", _TIME, nullable=False),
    Column("state", String(16), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("created_at", _TIME, nullable=False),
    Column("active_from", _TIME, nullable=True),
    Column("mac", String(64), nullable=False),  # HSM HMAC of the row (services/escrow.py)
)

escrow_decisions = Table(
    "escrow_decisions",
    metadata,
    Column("case_id", String(64), ForeignKey("escrow_cases.case_id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("custodian", String(64), primary_key=True),
    Column("decision", String(8), primary_key=True),  # approve | reject
    Column("signature", LargeBinary, nullable=False),
    Column("recorded_at", _TIME, nullable=False),
)

# Outbox of webhook notifications to the data owner, delivered with retries.
notifications = Table(
    "notifications",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("case_id", String(64), nullable=False),
    Column("event", String(32), nullable=False),
    Column("payload", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | expired
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", _TIME, nullable=False),
    Column("expires_at", _TIME, nullable=False),
    Column("last_error", String(200), nullable=True),
)


# -- SigV4 credentials (kms/services/sigv4.py) ----------------------------------------------
# The secret is AES-256-GCM encrypted in the HSM under a KEK made for the credential, which
# is stored wrapped under the HSM root key: nothing here is usable without the HSM.
sigv4_credentials = Table(
    "sigv4_credentials",
    metadata,
    Column("access_key_id", String(32), primary_key=True),
    Column("principal_id", Integer, ForeignKey("principals.id"), nullable=False),
    Column("sealed_secret", LargeBinary, nullable=False),  # IV || ciphertext || tag
    Column("wrapped_kek", LargeBinary, nullable=False),
    Column("root_label", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # active | revoked
    Column("created_at", _TIME, nullable=False),
    Column("seal", String(64), nullable=True),  # kms/services/seals.py; NULL: refused
    # the key-wrap mechanism that wrapped wrapped_kek, as in key_versions (sealed the same way)
    Column("wrap_mechanism", String(32), nullable=False, server_default=LEGACY_WRAP_MECHANISM),
    Index("ix_sigv4_principal", "principal_id"),
)

# Signatures already accepted, kept until they could no longer pass the clock-skew check.
sigv4_nonces = Table(
    "sigv4_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("expires_at", _TIME, nullable=False),
    Index("ix_sigv4_nonce_expiry", "expires_at"),
)


# -- XKS proxy API (kms/services/xks.py) ----------------------------------------------------
# Per-key policy of the XKS face (kms/formats/xks.py XksKeyPolicy); no row: the default.
xks_key_policies = Table(
    "xks_key_policies",
    metadata,
    Column("key_id", String(64), ForeignKey("keys.key_id"), primary_key=True),
    Column("usage", String(32), nullable=False),  # "encrypt,decrypt", "encrypt", "" ...
    Column("aws_principals", Text, nullable=True),  # JSON list of patterns; null: any
    Column("kms_operations", Text, nullable=True),  # JSON list of names; null: any
    Column("updated_at", _TIME, nullable=False),
    Column("seal", String(64), nullable=True),  # kms/services/seals.py; NULL: refused
)


# -- dual control (kms/services/changes.py) --------------------------------------------------
# The control policy in force: one row (id 1), sealed; absent until first pinned.
control_policy = Table(
    "control_policy",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mode", String(16), nullable=False),  # dual | single-operator
    Column("quorum", Integer, nullable=False),
    Column("required_groups", Text, nullable=False),  # JSON list, sorted
    Column("ttl_seconds", Integer, nullable=False),
    Column("mac", String(64), nullable=False),
)

# Proposed control-plane changes (kms/formats/change.py) and the approvers' decisions.
changes = Table(
    "changes",
    metadata,
    Column("change_id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("params", Text, nullable=False),  # canonical JSON
    Column("proposer", String(64), nullable=False),
    Column("created_at", _TIME, nullable=False),
    Column("expires_at", _TIME, nullable=False),
    Column("digest", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # pending | applied | rejected | cancelled
    Column("mac", String(64), nullable=False),
    Index("ix_changes_state", "state"),
)

change_decisions = Table(
    "change_decisions",
    metadata,
    Column("change_id", String(64), ForeignKey("changes.change_id"), primary_key=True),
    Column("custodian", String(64), primary_key=True),
    Column("decision", String(8), nullable=False),  # approve | reject
    Column("signature", LargeBinary, nullable=False),
    Column("recorded_at", _TIME, nullable=False),
)

"""Plain domain types shared by services, backends and adapters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Role(enum.StrEnum):
    ADMIN = "admin"
    SERVICE = "service"
    AUDITOR = "auditor"
    CUSTODIAN = "custodian"
    REQUESTER = "requester"


class KeyState(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DELETION = "pending_deletion"
    DESTROYED = "destroyed"  # deletion ran: every version's material is erased


class Permission(enum.StrEnum):
    """What a grant can allow on a key (the grant wire field is named "operations")."""

    DATAKEY = "datakey"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    REWRAP = "rewrap"
    # Through the XKS face only (AWS KMS calling in). Distinct from the native operations,
    # so that the credential AWS holds for XKS cannot decrypt through any other face.
    XKS_ENCRYPT = "xks_encrypt"
    XKS_DECRYPT = "xks_decrypt"


JUSTIFICATIONS = frozenset(
    {"service_processing", "customer_initiated", "backup_restore", "legal_request", "break_glass"}
)
DEFAULT_JUSTIFICATION = "service_processing"
# Only ever through an approved escrow case, never through a grant.
ESCROW_ONLY_JUSTIFICATIONS = frozenset({"legal_request", "break_glass"})


@dataclass(frozen=True)
class Principal:
    """A principal. ``disabled_at``: set while it is disabled (every token, SigV4
    credential, certificate and dashboard session of it is refused); ``sessions_since``:
    dashboard sessions that logged in before it are ended."""

    id: int
    name: str
    role: Role
    created_at: datetime
    disabled_at: datetime | None = None
    sessions_since: datetime | None = None

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


@dataclass(frozen=True)
class Token:
    """A bearer token as listed: ``token_id`` is the first 16 hex digits of its SHA-256
    (the token itself is never stored); ``expires_at`` None: it does not expire;
    ``last_used_at`` is kept to the minute (TOKEN_USE_RESOLUTION), and not sealed."""

    token_id: str
    principal_id: int
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    rotated_at: datetime | None = None  # sealed: a rotation replaced it (once only)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class Key:
    key_id: str
    alias: str | None
    description: str
    state: KeyState
    current_version: int
    created_at: datetime
    deletion_date: datetime | None = None
    escrow_policy: EscrowPolicy | None = None
    rotation_period_days: int | None = None  # None: no scheduled rotation
    # Blobs under an older version are refused (retired); only moves forward.
    min_decryption_version: int = 1
    rotated_at: datetime | None = None  # when the current version was made

    def usable_for(self, version: int) -> bool:
        """Whether blobs under ``version`` may still be opened: not retired (the key's
        state is a separate question)."""
        return version >= self.min_decryption_version


@dataclass(frozen=True)
class VersionUsage:
    """One version of a key and its use, counted from the audit trail (records still
    held: archived records are not counted)."""

    version: int
    created_at: datetime
    decrypts: int  # successful decrypt, rewrap and xks_decrypt records naming this version
    last_used: str | None  # time of the newest such record
    retired: bool


@dataclass(frozen=True)
class UsageDay:
    day: str  # YYYY-MM-DD (UTC)
    version: int
    decrypts: int


@dataclass(frozen=True)
class KeyUsage:
    key: Key
    versions: list[VersionUsage]
    days: list[UsageDay]  # only days with use, oldest first


# The key-wrap mechanism of every KEK wrapped before mechanisms were recorded (migration
# 0013): CKM_AES_KEY_WRAP_PAD, which SoftHSM implements as RFC 5649.
LEGACY_WRAP_MECHANISM = "CKM_AES_KEY_WRAP_PAD"


@dataclass(frozen=True)
class KeyVersion:
    key_id: str
    version: int
    created_at: datetime
    # KEK material wrapped under the HSM root key; useless without the HSM.
    wrapped: bytes = field(repr=False)
    root_label: str = "kms-root"
    wrap_mechanism: str = LEGACY_WRAP_MECHANISM  # the mechanism that wrapped it

    def ref(self) -> KekRef:
        """What the HSM backend needs to use this version."""
        return KekRef(self.key_id, self.version, self.wrapped, self.root_label, self.wrap_mechanism)


@dataclass(frozen=True)
class WrappedKek:
    """A KEK as it leaves the HSM: wrapped under the root key named ``root_label`` with
    the key-wrap mechanism ``wrap_mechanism`` (a name of hsm_config/profiles.py)."""

    wrapped: bytes = field(repr=False)
    root_label: str = "kms-root"
    wrap_mechanism: str = LEGACY_WRAP_MECHANISM

    def ref(self, key_id: str, version: int) -> KekRef:
        """This KEK as version ``version`` of ``key_id``, for the HSM backend."""
        return KekRef(key_id, version, self.wrapped, self.root_label, self.wrap_mechanism)

    def as_version(self, key_id: str, version: int, created_at: datetime) -> KeyVersion:
        """This KEK as the stored version ``version`` of ``key_id``."""
        return KeyVersion(
            key_id, version, created_at, self.wrapped, self.root_label, self.wrap_mechanism
        )


@dataclass(frozen=True)
class KekRef:
    """What the HSM backend needs to use one KEK version (cache key: key_id, version)."""

    key_id: str
    version: int
    wrapped: bytes = field(repr=False)
    root_label: str = "kms-root"
    wrap_mechanism: str = LEGACY_WRAP_MECHANISM


@dataclass(frozen=True)
class AuditEvent:
    """What a service knows about one operation; storage adds seq and the chain hashes."""

    request_id: str
    principal: str | None
    operation: str
    outcome: str = "ok"
    key_id: str | None = None
    key_version: int | None = None
    context_sha256: str | None = None
    justification: str | None = None
    case_id: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class AuditHead:
    """The chain head row: last seq and hash, newest checkpoint, archived prefix."""

    seq: int
    hash: str
    checkpoint_seq: int
    archived_seq: int


@dataclass(frozen=True)
class AuditQuery:
    """Filters for reading the audit trail; None means any. Times are record times
    ("YYYY-MM-DDTHH:MM:SS.mmmZ"), ``since`` inclusive, ``until`` exclusive."""

    key_id: str | None = None
    principal: str | None = None
    operation: str | None = None
    outcome: str | None = None
    case_id: str | None = None
    since: str | None = None
    until: str | None = None
    # records whose context_sha256 is one of these (the hashes of one context)
    context_hashes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Grant:
    """What a service may do with a key, and with which justifications."""

    operations: frozenset[str] = frozenset()
    justifications: frozenset[str] = frozenset({DEFAULT_JUSTIFICATION})

    def allows(self, permission: Permission, justification: str | None = None) -> bool:
        """Whether the grant allows ``permission``, and with ``justification`` if given."""
        return permission.value in self.operations and (
            justification is None or justification in self.justifications
        )


@dataclass(frozen=True)
class SigV4Credential:
    """An access key for SigV4; the secret is sealed by a KEK that only the HSM can unwrap
    (``sealed_secret`` = IV || AES-256-GCM ciphertext || tag, AAD the access key id)."""

    access_key_id: str
    principal: Principal
    sealed_secret: bytes = field(repr=False)
    wrapped_kek: bytes = field(repr=False)
    root_label: str
    state: str  # active | revoked
    created_at: str  # record time format
    wrap_mechanism: str = LEGACY_WRAP_MECHANISM  # that wrapped ``wrapped_kek``


@dataclass(frozen=True)
class KeyAccess:
    """A key and one principal's grant on it (empty if none), read together: what a
    decision on using the key is made on (kms/services/key_use.py)."""

    key: Key
    grant: Grant
    # the principal's grant row failed its HSM seal: ``grant`` is empty, this says why
    broken_grant: str | None = None


@dataclass(frozen=True)
class EscrowPolicy:
    """Who must approve an escrow case: ``quorum`` distinct custodians, at least one from
    each of ``required_groups``; one rejection from a ``veto_groups`` member blocks."""

    quorum: int = 2
    required_groups: frozenset[str] = frozenset()
    veto_groups: frozenset[str] = frozenset()

    def merge(self, other: EscrowPolicy) -> EscrowPolicy:
        """The stricter of two policies (a case over several keys needs all of them)."""
        return EscrowPolicy(
            max(self.quorum, other.quorum),
            self.required_groups | other.required_groups,
            self.veto_groups | other.veto_groups,
        )


class CaseState(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"  # quorum reached, waiting period running
    ACTIVE = "active"
    REJECTED = "rejected"
    EXPIRED = "expired"
    REVOKED = "revoked"
    CLOSED = "closed"


OPEN_CASE_STATES = frozenset({CaseState.PENDING, CaseState.APPROVED, CaseState.ACTIVE})


@dataclass(frozen=True)
class Custodian:
    name: str
    group: str
    public_key: bytes
    state: str
    created_at: str
    mac: str = ""


@dataclass(frozen=True)
class EscrowCase:
    """An escrow case. Times are record-time strings ("YYYY-MM-DDTHH:MM:SS.mmmZ");
    ``scope`` is {"keys": [...], "context": {...} | None, "blobs": [sha256 hex] | None}."""

    case_id: str
    version: int
    requester: str
    legal_basis: str
    reference: str
    justification: str
    scope: dict[str, Any]
    max_unwraps: int
    unwraps_used: int
    expires_at: str
    state: CaseState
    digest: str
    created_at: str
    active_from: str | None = None
    mac: str = ""


@dataclass(frozen=True)
class Decision:
    custodian: str
    decision: str  # approve | reject
    version: int
    signature: bytes = field(repr=False)
    recorded_at: str = ""


@dataclass(frozen=True)
class Notification:
    id: int
    case_id: str
    event: str
    payload: str
    state: str
    attempts: int
    next_attempt_at: str
    expires_at: str
    last_error: str | None = None

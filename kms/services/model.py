"""Plain domain types shared by services, backends and adapters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


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


class Operation(enum.StrEnum):
    """Operations a grant can allow on a key."""

    DATAKEY = "datakey"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    REWRAP = "rewrap"


JUSTIFICATIONS = frozenset(
    {"service_processing", "customer_initiated", "backup_restore", "legal_request", "break_glass"}
)
DEFAULT_JUSTIFICATION = "service_processing"


@dataclass(frozen=True)
class Principal:
    id: int
    name: str
    role: Role
    created_at: datetime


@dataclass(frozen=True)
class Key:
    key_id: str
    alias: str | None
    description: str
    state: KeyState
    current_version: int
    created_at: datetime
    deletion_date: datetime | None = None


@dataclass(frozen=True)
class KeyVersion:
    key_id: str
    version: int
    created_at: datetime
    # KEK material wrapped under the HSM root key; useless without the HSM.
    wrapped: bytes = field(repr=False)
    root_label: str = "kms-root"


@dataclass(frozen=True)
class WrappedKek:
    """A KEK as it leaves the HSM: wrapped under the root key named ``root_label``."""

    wrapped: bytes = field(repr=False)
    root_label: str = "kms-root"


@dataclass(frozen=True)
class KekRef:
    """What the HSM backend needs to use one KEK version (cache key: key_id, version)."""

    key_id: str
    version: int
    wrapped: bytes = field(repr=False)
    root_label: str = "kms-root"


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

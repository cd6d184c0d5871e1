"""Interfaces the services need from backends, chosen by configuration in create_app."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from kms.services.model import (
    AuditHead,
    AuditQuery,
    Custodian,
    Decision,
    EscrowCase,
    Grant,
    KekRef,
    Key,
    KeyState,
    KeyVersion,
    Notification,
    Principal,
    Role,
    WrappedKek,
)


class Hsm(Protocol):
    """A PKCS#11 token holding the root key and the audit signing key.

    Every method raises kms.errors.HsmUnavailable when the HSM cannot be used.
    """

    def new_wrapped_kek(self) -> WrappedKek:
        """Generate an AES-256 KEK inside the HSM; return it wrapped under the root key."""

    def encrypt(self, kek: KekRef, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM encrypt inside the HSM; returns ciphertext || 16-byte tag."""

    def decrypt(self, kek: KekRef, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM decrypt; raises kms.errors.IntegrityFailure if authentication fails."""

    def random(self, n: int) -> bytes:
        """``n`` bytes from the HSM's random generator."""

    def check(self) -> None:
        """Return only if a logged-in session can use the root key right now."""

    def audit_public_key_pem(self) -> bytes:
        """PEM SubjectPublicKeyInfo of the audit signing key."""

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the HSM's integrity key (seals database rows)."""

    def cache_stats(self) -> dict[str, int]:
        """Counters of the per-process KEK cache (for logs and benchmarks)."""

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA P-256 signature of a SHA-256 ``digest`` by the audit signing key."""


class Tx(Protocol):
    """One database transaction. Leaving the context commits; an exception rolls back."""

    # principals
    def add_principal(self, name: str, role: Role, token_hash: str, now: datetime) -> Principal: ...
    def principal_by_token_hash(self, token_hash: str) -> Principal | None: ...
    def principal_by_name(self, name: str) -> Principal | None: ...
    def list_principals(self) -> list[Principal]: ...

    # keys
    def add_key(self, key: Key) -> None: ...
    def add_version(self, version: KeyVersion) -> None: ...
    def update_key(self, key: Key) -> None: ...
    def key_by_id(self, key_id: str) -> Key | None: ...
    def key_by_alias(self, alias: str) -> Key | None: ...
    def list_keys(self) -> list[Key]: ...
    def key_version(self, key_id: str, version: int) -> KeyVersion | None: ...

    # grants
    def put_grant(self, key_id: str, principal_id: int, grant: Grant) -> None: ...
    def grant(self, key_id: str, principal_id: int) -> Grant:
        """The principal's grant on the key (empty if none)."""

    def key_access(self, key_id: str, principal_id: int) -> tuple[KeyState, Grant] | None:
        """The key's state and the principal's grant on it, in one read (None: no key)."""

    # escrow
    def add_custodian(self, custodian: Custodian) -> None: ...
    def custodian(self, name: str) -> Custodian | None: ...
    def list_custodians(self) -> list[Custodian]: ...
    def set_custodian_state(self, name: str, state: str, mac: str) -> None: ...
    def add_case(self, case: EscrowCase) -> None: ...
    def update_case(self, case: EscrowCase) -> None: ...
    def case(self, case_id: str) -> EscrowCase | None:
        """The case, locked until the transaction ends."""

    def add_decision(self, case_id: str, decision: Decision) -> None:
        """Conflict if that custodian already decided the same way on that version."""

    def decisions(self, case_id: str) -> list[Decision]: ...
    def add_notification(self, notification: Notification) -> None: ...
    def claim_notifications(self, now: str, lease_until: str, limit: int) -> list[Notification]:
        """Due pending notifications, each leased to the caller until ``lease_until``."""

    def update_notification(self, notification: Notification) -> None: ...
    def notifications(self, case_id: str) -> list[Notification]: ...

    # audit (the chain logic lives in services.audit)
    def audit_head(self) -> AuditHead:
        """The chain head, locked until the transaction ends."""

    def insert_audit(self, records: Sequence[dict[str, Any]]) -> None:
        """Insert chained records and move the head to the last one."""

    def audit_records(
        self, after: int, limit: int, until: int | None = None, query: AuditQuery | None = None
    ) -> list[dict[str, Any]]:
        """Records with after < seq (<= until), matching ``query``, in chain order."""

    def audit_counts(self, since: str, until: str) -> list[dict[str, Any]]:
        """Record counts in a time range grouped by key_id, principal, operation, outcome,
        justification and escrow (case_id present)."""

    def insert_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store a signed checkpoint and mark it the newest in the head row."""

    def checkpoints(self, after: int, until: int | None, limit: int) -> list[dict[str, Any]]: ...

    def archive_audit_through(self, seq: int) -> int:
        """Delete records with seq <= ``seq`` (already exported); returns how many."""


class Storage(Protocol):
    def transaction(self) -> AbstractContextManager[Tx]:
        """A write transaction; writers are serialised, so the audit chain stays linear."""

    def reader(self) -> AbstractContextManager[Tx]:
        """A read-only transaction."""

    def check(self) -> None:
        """Return only if the database answers and its schema is current."""


class Clock(Protocol):
    def now(self) -> datetime: ...

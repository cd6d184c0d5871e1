"""Interfaces the services need from backends, chosen by configuration in create_app."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from kms.services.model import KekRef, Key, KeyState, KeyVersion, Principal, Role


class Hsm(Protocol):
    """A PKCS#11 token holding the root key and the audit signing key.

    Every method raises kms.errors.HsmUnavailable when the HSM cannot be used.
    """

    def new_wrapped_kek(self) -> bytes:
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
    def count_keys_in_state(self, state: KeyState) -> int: ...

    # grants
    def put_grant(self, key_id: str, principal_id: int, operations: frozenset[str]) -> None: ...
    def grant_operations(self, key_id: str, principal_id: int) -> frozenset[str]: ...

    # audit (the chain logic lives in services.audit)
    def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the last record, locked until the transaction ends."""

    def insert_audit(self, records: Sequence[dict[str, Any]]) -> None: ...
    def audit_records(self, after: int, limit: int) -> list[dict[str, Any]]: ...


class Storage(Protocol):
    def transaction(self) -> AbstractContextManager[Tx]:
        """A write transaction; writers are serialised, so the audit chain stays linear."""

    def reader(self) -> AbstractContextManager[Tx]:
        """A read-only transaction."""

    def check(self) -> None:
        """Return only if the database answers and its schema is current."""


class Clock(Protocol):
    def now(self) -> datetime: ...

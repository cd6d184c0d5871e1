"""Interfaces the services need from backends, chosen by configuration in create_app.

The database port is split by table family (PrincipalRows, KeyRows, AuditRows...). A
service receives a ``Store`` of the rows it uses, e.g. ``Store[AuditRows]``, or of a
Protocol combining several that it defines next to itself; ``Tx`` combines them all.
The HSM's port is in hsm_port.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol, TypeVar

from kms.formats.xks import XksKeyPolicy
from kms.services.change_model import ChangeRows
from kms.services.model import (
    AuditHead,
    AuditQuery,
    Custodian,
    Decision,
    EscrowCase,
    Grant,
    Key,
    KeyAccess,
    KeyState,
    KeyVersion,
    Notification,
    Principal,
    Role,
    SigV4Credential,
    Token,
    UsageDay,
)


class TxSeals(Protocol):
    """The seals of one transaction (kms/services/seals.py TxSeals)."""

    written: dict[tuple[str, str], str | None]

    def seal(self, kind: str, fields: Mapping[str, Any]) -> str: ...
    def check(self, kind: str, fields: Mapping[str, Any], seal: object) -> None:
        """Return only if ``seal`` seals ``fields`` and is the row's current seal;
        kms.errors.SealBroken otherwise."""

    def wrote(self, kind: str, ident: str, seal: str | None) -> None: ...
    def current(self, kind: str, ident: str, seal: str) -> None: ...
    def absent(self, kind: str, ident: str) -> None: ...
    def complete(self, kind: str, found: set[str]) -> None: ...


class Seals(Protocol):
    """HSM seals on rows (kms/services/seals.py): the storage layer seals what it writes
    and checks what it reads, fresh against the HSM state anchor
    (kms/services/state_index.py)."""

    def follow(self, storage: Store[Tx]) -> None: ...
    def begin(self) -> TxSeals: ...
    def commit(self, tx: SealRows, seals: TxSeals) -> Callable[[bool], None] | None:
        """Before ``tx`` commits: log its sealed writes; what to call after the commit
        (True) or its failure (False)."""


class PrincipalRows(Protocol):
    """Principals and the SHA-256 hashes of their bearer tokens."""

    def add_principal(
        self,
        name: str,
        role: Role,
        token_hash: str,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> Principal:
        """Conflict if the name is taken."""

    def update_principal(self, principal: Principal) -> None:
        """Write its lifecycle fields (disabled_at, sessions_since)."""

    def add_token(
        self, principal_id: int, token_hash: str, now: datetime, expires_at: datetime | None
    ) -> None: ...
    def token_holder(self, token_hash: str) -> tuple[Principal, Token] | None: ...
    def tokens_of(self, principal_id: int) -> list[tuple[str, Token]]:
        """(full hash, token) of every token of the principal, oldest first."""

    def token_hashes(self, principal_id: int) -> list[str]:
        """The SHA-256 of every token row of the principal, read from the key column only
        (to revoke a token whose other columns were made unreadable)."""

    def set_token_rotated(
        self, token_hash: str, principal_id: int, expires_at: datetime, rotated_at: datetime
    ) -> None:
        """Mark the token replaced by a rotation at ``rotated_at``, expiring at
        ``expires_at``."""

    def delete_token(self, token_hash: str, principal_id: int) -> None: ...
    def touch_token(self, token_hash: str, now: datetime) -> None:
        """Note the token's last use (not sealed)."""

    def principal_by_name(self, name: str) -> Principal | None: ...
    def list_principals(self) -> list[Principal]:
        """Every principal whose row verifies its seal."""

    def principal_count(self) -> int:
        """Every principal row, whether or not it verifies."""


class KeyRows(Protocol):
    """Keys, their versions (each a KEK wrapped under the HSM root key) and aliases."""

    def add_key(self, key: Key) -> None: ...
    def add_version(self, version: KeyVersion) -> None: ...
    def update_key(self, key: Key) -> None: ...
    def key_by_id(self, key_id: str) -> Key | None: ...
    def key_by_alias(self, alias: str) -> Key | None: ...
    def set_alias(self, key_id: str, alias: str) -> None:
        """Give an existing key an alias; Conflict if the alias is taken or the key has one."""

    def list_keys(self) -> list[Key]: ...
    def key_version(self, key_id: str, version: int) -> KeyVersion | None: ...


class GrantRows(Protocol):
    """What each principal may do with each key."""

    def put_grant(self, key_id: str, principal_id: int, grant: Grant) -> None: ...
    def grant(self, key_id: str, principal_id: int) -> Grant:
        """The principal's grant on the key (empty if none)."""

    def key_access(self, key_id: str, principal_id: int) -> KeyAccess | None:
        """The key's state, the principal's grant on it and its minimum decryption
        version, in one read (None: no key)."""


class LifecycleRows(Protocol):
    """Rotation and deletion: keys by state, use counted from the audit trail, erasure."""

    def keys_in_states(self, states: Sequence[KeyState]) -> list[Key]: ...
    def version_usage(self, key_id: str) -> list[tuple[int, datetime, int, str | None]]:
        """(version, created_at, successful decrypt/rewrap/xks_decrypt records, last time)."""
        ...

    def usage_by_day(self, key_id: str, since: str) -> list[UsageDay]: ...
    def destroy_versions(self, key_id: str) -> int:
        """Erase every version's wrapped KEK material of the key; how many."""
        ...


class SigV4Rows(Protocol):
    """SigV4 credentials (services/sigv4.py)."""

    def add_sigv4_credential(self, credential: SigV4Credential) -> None: ...
    def sigv4_credential(self, access_key_id: str) -> SigV4Credential | None: ...
    def sigv4_credentials_of(self, principal_id: int) -> list[SigV4Credential]: ...
    def set_sigv4_state(self, access_key_id: str, state: str) -> None: ...


class NonceRows(Protocol):
    """The replay store of SigV4 signatures when no Redis is configured."""

    def remember_nonce(self, nonce: str, expires_at: str, now: str) -> bool:
        """Record a nonce until ``expires_at``; False if already recorded (a replay)."""
        ...

    def prune_nonces(self, now: str, limit: int) -> int:
        """Delete up to ``limit`` nonces expired at ``now``; how many."""
        ...


class XksRows(Protocol):
    """The per-key policies of the XKS face (services/xks.py)."""

    def xks_policy(self, key_id: str) -> XksKeyPolicy | None:
        """The key's XKS policy; None: none stored (the default applies)."""

    def put_xks_policy(self, key_id: str, policy: XksKeyPolicy, now: str) -> None:
        """Store (replace) the key's XKS policy."""


class CustodianRows(Protocol):
    """Escrow custodians and their public keys (rows sealed by the HSM)."""

    def add_custodian(self, custodian: Custodian) -> None: ...
    def custodian(self, name: str) -> Custodian | None: ...
    def list_custodians(self) -> list[Custodian]: ...
    def set_custodian_state(self, name: str, state: str, mac: str) -> None: ...


class CaseRows(Protocol):
    """Escrow cases and the custodians' decisions on them."""

    def add_case(self, case: EscrowCase) -> None: ...
    def update_case(self, case: EscrowCase) -> None: ...
    def case(self, case_id: str) -> EscrowCase | None:
        """The case, locked until the transaction ends."""

    def list_cases(self, states: Sequence[str]) -> list[EscrowCase]:
        """Cases whose state is among ``states`` (CaseState values), oldest first."""

    def add_decision(self, case_id: str, decision: Decision) -> None:
        """Conflict if that custodian already decided the same way on that version."""

    def decisions(self, case_id: str) -> list[Decision]: ...


class NotificationRows(Protocol):
    """The outbox of webhook notifications to the data owner (services/notify.py)."""

    def add_notification(self, notification: Notification) -> None: ...
    def claim_notifications(self, now: str, lease_until: str, limit: int) -> list[Notification]:
        """Due pending notifications, each leased to the caller until ``lease_until``."""

    def update_notification(self, notification: Notification) -> None: ...
    def notifications(self, case_id: str) -> list[Notification]: ...


class AuditRows(Protocol):
    """The audit chain's records, head and signed checkpoints (the chain logic lives in
    services/audit.py)."""

    def audit_head(self) -> AuditHead:
        """The chain head, locked until the transaction ends."""

    def audit_links(self, after: int, until: int, limit: int) -> list[tuple[int, str, str]]:
        """(seq, prev_hash, hash) of records after < seq <= until, in order: the links
        alone, for checking a chain without reading its records."""

    def audit_chain_id(self) -> str | None:
        """The id naming the chain's HSM anchor (None: not anchored yet)."""

    def set_audit_chain_id(self, chain_id: str) -> None: ...

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


class SealRows(Protocol):
    def seal_unsealed(self) -> dict[str, int]:
        """Seal every row that has no seal yet (kms/backends/storage/seal_tx.py); how
        many of each kind."""
        ...

    def sealed_rows(self) -> Iterator[tuple[str, str, str]]:
        """Every sealed row as (kind, ident, seal or "-") (kms/formats/state.py)."""
        ...

    def state_seq(self) -> int: ...
    def state_changes(self, after: int) -> list[tuple[int, str, str, str | None]]: ...
    def add_state_changes(self, n: int, changes: Mapping[tuple[str, str], str | None]) -> None: ...
    def check_current(self, kind: str, ident: str, seal: str) -> None:
        """SealBroken unless ``seal`` is the current seal of a row the service layer
        sealed (the escrow rows; the storage checks its own)."""
        ...

    def check_absent(self, kind: str, ident: str) -> None:
        """SealBroken if row (kind, ident), not found, is in the current sealed state
        (deleted in the database)."""
        ...

    def check_complete(self, kind: str, found: set[str]) -> None:
        """SealBroken if a current row of ``kind`` is not among the idents ``found``."""
        ...


class Tx(
    ChangeRows,
    PrincipalRows,
    SealRows,
    KeyRows,
    GrantRows,
    LifecycleRows,
    SigV4Rows,
    NonceRows,
    XksRows,
    CustodianRows,
    CaseRows,
    NotificationRows,
    AuditRows,
    Protocol,
):
    """One database transaction over every table. Leaving the context commits; an
    exception rolls back. A service that needs a few tables asks for a Store of a
    Protocol combining their *Rows instead."""


TxT_co = TypeVar("TxT_co", covariant=True)


class Store(Protocol[TxT_co]):
    """Transactions whose rows are ``TxT_co`` (one *Rows protocol, a combination, or Tx).
    Storage is a Store[Tx], and so a Store of any part of Tx."""

    def transaction(self) -> AbstractContextManager[TxT_co]:
        """A write transaction; writers are serialised, so the audit chain stays linear."""

    def reader(self) -> AbstractContextManager[TxT_co]:
        """A read-only transaction."""


class StorageUpkeep(Protocol):
    """The database's health check and its routine upkeep outside any request."""

    def checkpoint_wal(self) -> None:
        """Background upkeep, twice a second per worker: move the database's write-ahead
        log into its files (SQLite; nothing on PostgreSQL). Never raises."""
        ...

    def check(self) -> None:
        """Return only if the database answers and its schema is current."""


class Storage(Store[Tx], StorageUpkeep, Protocol):
    """The database, chosen by configuration in create_app."""

    def seal_with(self, seals: Seals) -> None:
        """Seal every row that grants or describes access with ``seals`` on write, and
        check it on read (kms/services/seals.py)."""
        ...

    def purge_erased(self) -> None:
        """Best effort: make deleted rows unrecoverable from the database files now (not
        only at the next routine checkpoint). Never raises."""
        ...


class Clock(Protocol):
    def now(self) -> datetime: ...


# -- state shared by every worker and node (Redis when KMS_REDIS_URL is set) ------------


class NonceStore(Protocol):
    def remember(self, nonce: str, now: datetime, until: datetime) -> bool:
        """Record ``nonce`` until ``until``; False if it is already recorded (a replay).
        Raises StorageUnavailable when it cannot tell: the caller refuses (fail closed)."""
        ...


class RateLimiter(Protocol):
    def hit(self, bucket: str, amount: int, seconds: int, cost: int = 1) -> float:
        """Count ``cost`` requests in ``bucket`` and return 0.0 if at most ``amount`` are
        then counted in the last ``seconds`` (a moving window, atomically for all processes
        sharing the store); otherwise count nothing and return the seconds until one would
        be counted. Never raises: without its shared store it counts in this process."""
        ...

    def spend(self, bucket: str, amount: int, seconds: int, cost: int) -> float:
        """As hit(), on a sliding-window counter (constant memory whatever ``amount``,
        approximate within a window): for budgets of many units over long windows."""
        ...

    def wait(self, bucket: str, amount: int, seconds: int) -> float:
        """The seconds until hit() would count one more in ``bucket`` (0.0: it would
        now), counting nothing. Never raises."""
        ...


class Leases(Protocol):
    def hold(self, name: str, seconds: int) -> AbstractContextManager[bool]:
        """Enter with True if this process now holds ``name`` (until the block ends or
        ``seconds`` pass), False if another process holds it. Never raises; True when the
        store cannot be reached (a lease only saves duplicate work)."""
        ...


class InvalidationBus(Protocol):
    def publish(self, kind: str, ident: str) -> None:
        """Announce to every process that ``ident`` (of ``kind``) changed; raises
        StorageUnavailable if it could not."""
        ...

    def poll(self) -> list[tuple[str, str]] | None:
        """(kind, ident) announced since this process's previous poll, oldest first; None
        if some may be lost (drop every cached entry). Raises StorageUnavailable when the
        store cannot be reached."""
        ...

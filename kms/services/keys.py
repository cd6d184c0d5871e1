"""Key lifecycle: create, describe, rotate, enable/disable, scheduled deletion, grants.

State machine (anything else is refused with 409 ``key_state``)::

    enabled  --disable-->  disabled  --enable-->  enabled
    enabled|disabled  --schedule-deletion-->  pending_deletion
    pending_deletion  --cancel-deletion-->  disabled
    pending_deletion  --deletion date passed, run_due-->  destroyed (material erased)

Only enabled keys are used for crypto. Versions only grow; rotation (on demand, or by
``run_due`` once ``rotation_period_days`` passed since the last one) adds a version
generated inside the HSM and makes it current. Older versions stay usable for decryption
until retired: blobs under a version below ``min_decryption_version`` are refused. The HSM
call that makes a new KEK happens before the write transaction, so a failure leaves no
trace but its audit record and no half-made version. Disabled keys keep their material;
destroyed keys have none left (their blobs can never be opened again).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from kms.errors import InvalidRequest, KeyStateError, KmsError, NotFound
from kms.services.audit import AuditTrail, Caller, EventBuilder, format_time
from kms.services.model import (
    DEFAULT_JUSTIFICATION,
    ESCROW_ONLY_JUSTIFICATIONS,
    JUSTIFICATIONS,
    EscrowPolicy,
    Grant,
    Key,
    KeyState,
    KeyUsage,
    KeyVersion,
    Principal,
    Role,
    VersionUsage,
)
from kms.services.model import Permission as GrantOp
from kms.services.ports import Clock, Hsm, KeyRows, Storage

ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9/_.-]{0,63}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_DESCRIPTION = 1024
MIN_PENDING_DAYS, MAX_PENDING_DAYS = 7, 30
MIN_ROTATION_DAYS, MAX_ROTATION_DAYS = 1, 3650


# Who the scheduler acts as: an in-memory admin, never stored, whose name no real principal
# can have (principal names cannot contain ':').
SCHEDULER = Principal(0, "system:scheduler", Role.ADMIN, datetime(1970, 1, 1, tzinfo=UTC))


class Unset:
    """Marks an argument that was not given (None is a value: "turn off")."""


UNSET = Unset()


def resolve(tx: KeyRows, ref: str) -> Key:
    """The key named by a key id or an alias; NotFound otherwise."""
    key = tx.key_by_id(ref) if UUID_RE.fullmatch(ref) else tx.key_by_alias(ref)
    if key is None:
        raise NotFound("no such key")
    return key


def parse_grant_justifications(values: list[str] | None) -> frozenset[str]:
    if values is None:
        return frozenset({DEFAULT_JUSTIFICATION})
    bad = [v for v in values if v not in JUSTIFICATIONS]
    if bad or not values:
        raise InvalidRequest("justifications must be among: " + ", ".join(sorted(JUSTIFICATIONS)))
    if set(values) & ESCROW_ONLY_JUSTIFICATIONS:
        raise InvalidRequest(
            "legal_request and break_glass are never granted; they need an escrow case"
        )
    return frozenset(values)


def parse_operations(values: list[str]) -> frozenset[str]:
    allowed = {o.value for o in GrantOp}
    bad = [v for v in values if v not in allowed]
    if bad:
        raise InvalidRequest("operations must be among: " + ", ".join(sorted(allowed)))
    return frozenset(values)


class KeyService:
    def __init__(self, storage: Storage, hsm: Hsm, audit: AuditTrail, clock: Clock) -> None:
        self._storage = storage
        self._hsm = hsm
        self._audit = audit
        self._clock = clock

    def create(self, caller: Caller, alias: str | None, description: str) -> Key:
        """A new enabled key whose version 1 was generated inside the HSM."""
        with self._audit.operation(caller, "create_key") as op:
            caller.require(Role.ADMIN)
            if alias is not None and (not ALIAS_RE.fullmatch(alias) or UUID_RE.fullmatch(alias)):
                raise InvalidRequest(
                    "alias must be 1-64 characters of letters, digits, '/', '_', '.', '-' "
                    "and must not look like a key id"
                )
            if len(description) > MAX_DESCRIPTION:
                raise InvalidRequest(f"description must be at most {MAX_DESCRIPTION} characters")
            key_id = str(uuid.uuid4())
            op.note(key_id=key_id, key_version=1)
            wrapped = self._hsm.new_wrapped_kek()
            now = self._clock.now()
            key = Key(key_id, alias, description, KeyState.ENABLED, 1, now, rotated_at=now)
            with self._storage.transaction() as tx:
                tx.add_key(key)
                tx.add_version(KeyVersion(key_id, 1, now, wrapped.wrapped, wrapped.root_label))
                self._audit.append(tx, [op.ok()])
            return key

    def get(self, caller: Caller, ref: str) -> Key:
        with self._audit.operation(caller, "describe_key"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            with self._storage.reader() as tx:
                return resolve(tx, ref)

    def list_keys(self, caller: Caller) -> list[Key]:
        with self._audit.operation(caller, "list_keys"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            with self._storage.reader() as tx:
                return tx.list_keys()

    def rotate(self, caller: Caller, ref: str) -> Key:
        """Add a version generated in the HSM and make it current (enabled keys only)."""
        with self._audit.operation(caller, "rotate_key") as op:
            caller.require(Role.ADMIN)
            with self._storage.reader() as tx:
                key = resolve(tx, ref)
            op.note(key_id=key.key_id)
            _require_enabled(key)
            new = self._add_version(op, key, _require_enabled)
            assert new is not None  # the check raises rather than skipping
            return new

    def configure(
        self,
        caller: Caller,
        ref: str,
        rotation_period_days: int | Unset | None = UNSET,
        min_decryption_version: int | None = None,
    ) -> Key:
        """Change the rotation period (None: off; at least MIN_ROTATION_DAYS) and/or move
        ``min_decryption_version`` forward (never backwards, never past the current
        version). Nothing changes unless every given value is valid."""
        with self._audit.operation(caller, "configure_key") as op:
            caller.require(Role.ADMIN)
            if isinstance(rotation_period_days, int) and not (
                MIN_ROTATION_DAYS <= rotation_period_days <= MAX_ROTATION_DAYS
            ):
                raise InvalidRequest(
                    f"rotation_period_days must be between {MIN_ROTATION_DAYS} and "
                    f"{MAX_ROTATION_DAYS}, or null to turn scheduled rotation off"
                )
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                op.note(key_id=key.key_id)
                if key.state is KeyState.DESTROYED:
                    raise KeyStateError.of(key.state.value)
                new = key
                if not isinstance(rotation_period_days, Unset):
                    new = replace(new, rotation_period_days=rotation_period_days)
                if min_decryption_version is not None:
                    _check_min_version(key, min_decryption_version)
                    new = replace(new, min_decryption_version=min_decryption_version)
                tx.update_key(new)
                self._audit.append(
                    tx,
                    [
                        op.ok(
                            detail=f"rotation_period_days={new.rotation_period_days} "
                            f"min_decryption_version={new.min_decryption_version}"
                        )
                    ],
                )
            return new

    def retire(self, caller: Caller, ref: str, up_to_version: int) -> Key:
        """Retire versions 1..``up_to_version``: blobs under them are refused from now on."""
        return self.configure(caller, ref, min_decryption_version=up_to_version + 1)

    def usage(self, caller: Caller, ref: str, days: int = 30) -> KeyUsage:
        """Per-version use and use per day over the last ``days`` days (admins, auditors)."""
        with self._audit.operation(caller, "key_usage"):
            caller.require(Role.ADMIN, Role.AUDITOR)
            if not 1 <= days <= 366:
                raise InvalidRequest("days must be between 1 and 366")
            since = format_time(self._clock.now() - timedelta(days=days - 1))[:10]
            with self._storage.reader() as tx:
                key = resolve(tx, ref)
                versions = [
                    VersionUsage(v, _aware(made), n, last, v < key.min_decryption_version)
                    for v, made, n, last in tx.version_usage(key.key_id)
                ]
                per_day = tx.usage_by_day(key.key_id, since)
            return KeyUsage(key, versions, per_day)

    def rotation_due_count(self) -> int:
        """How many enabled keys are due for scheduled rotation now (not audited: for
        metrics)."""
        now = self._clock.now()
        with self._storage.reader() as tx:
            return sum(is_overdue(k, now) for k in tx.keys_in_states([KeyState.ENABLED]))

    def run_due(self, caller: Caller) -> DueRun:
        """Rotate every key whose rotation is due and destroy every key whose deletion
        date has passed. Safe to run in any number of processes at once: each change is
        re-checked under the database write lock, so a due key is rotated (or destroyed)
        exactly once and the loser of a race skips it. A failure leaves the key as it
        was (a version is added in the same transaction as its audit record) and the run
        goes on with the next key."""
        caller.require(Role.ADMIN)
        run = DueRun()
        now = self._clock.now()
        with self._storage.reader() as tx:
            due = [k for k in tx.keys_in_states([KeyState.ENABLED]) if is_overdue(k, now)]
            doomed = [
                k
                for k in tx.keys_in_states([KeyState.PENDING_DELETION])
                if k.deletion_date is not None and k.deletion_date <= now
            ]
        for key in due:
            try:
                with self._audit.operation(caller, "rotate_key") as op:
                    op.note(key_id=key.key_id, detail="scheduled")

                    def still_due(current: Key, was: int = key.current_version) -> bool:
                        return (
                            current.state is KeyState.ENABLED
                            and current.current_version == was
                            and is_overdue(current, self._clock.now())
                        )

                    new = self._add_version(op, key, still_due)
                if new is None:
                    run.skipped.append(key.key_id)
                else:
                    run.rotated.append((key.key_id, new.current_version))
            except Exception as e:  # the run goes on with the next key
                run.failed.append(
                    (key.key_id, e.code if isinstance(e, KmsError) else "internal_error")
                )
        for key in doomed:
            try:
                if self._destroy(caller, key.key_id):
                    run.destroyed.append(key.key_id)
                else:
                    run.skipped.append(key.key_id)
            except Exception as e:  # the run goes on with the next key
                run.failed.append(
                    (key.key_id, e.code if isinstance(e, KmsError) else "internal_error")
                )
        if run.destroyed:
            self._storage.purge_erased()
        return run

    def _add_version(
        self, op: EventBuilder, key: Key, check: Callable[[Key], object]
    ) -> Key | None:
        """Make a KEK in the HSM (outside any transaction), then under the write lock
        re-read the key and, unless ``check`` raises or returns False (skip: None),
        add the version, make it current and append the audit record, all in one
        transaction."""
        wrapped = self._hsm.new_wrapped_kek()
        with self._storage.transaction() as tx:
            current = resolve(tx, key.key_id)
            if check(current) is False:
                return None
            now = self._clock.now()
            new = replace(current, current_version=current.current_version + 1, rotated_at=now)
            v = new.current_version
            tx.add_version(KeyVersion(key.key_id, v, now, wrapped.wrapped, wrapped.root_label))
            tx.update_key(new)
            self._audit.append(tx, [op.ok(key_version=new.current_version)])
        return new

    def _destroy(self, caller: Caller, key_id: str) -> bool:
        """Erase the key's versions (crypto-shredding) if its deletion is still due."""
        with self._audit.operation(caller, "destroy_key") as op:
            op.note(key_id=key_id)
            with self._storage.transaction() as tx:
                key = resolve(tx, key_id)
                date = key.deletion_date
                if key.state is not KeyState.PENDING_DELETION or date is None:
                    return False
                if date > self._clock.now():
                    return False
                erased = tx.destroy_versions(key_id)
                tx.update_key(replace(key, state=KeyState.DESTROYED))
                self._audit.append(tx, [op.ok(detail=f"versions erased: {erased}")])
        self._hsm.forget(key_id)
        return True

    def disable(self, caller: Caller, ref: str) -> Key:
        return self._transition(
            caller, ref, "disable_key", {KeyState.ENABLED, KeyState.DISABLED}, KeyState.DISABLED
        )

    def enable(self, caller: Caller, ref: str) -> Key:
        return self._transition(
            caller, ref, "enable_key", {KeyState.ENABLED, KeyState.DISABLED}, KeyState.ENABLED
        )

    def schedule_deletion(self, caller: Caller, ref: str, pending_days: int) -> Key:
        def check() -> None:
            if not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
                raise InvalidRequest(
                    f"pending_days must be between {MIN_PENDING_DAYS} and {MAX_PENDING_DAYS}"
                )

        return self._transition(
            caller,
            ref,
            "schedule_key_deletion",
            {KeyState.ENABLED, KeyState.DISABLED},
            KeyState.PENDING_DELETION,
            check=check,
            deletion_date=self._clock.now() + timedelta(days=pending_days),
        )

    def cancel_deletion(self, caller: Caller, ref: str) -> Key:
        return self._transition(
            caller,
            ref,
            "cancel_key_deletion",
            {KeyState.PENDING_DELETION},
            KeyState.DISABLED,
            deletion_date=None,
        )

    def grant(
        self,
        caller: Caller,
        ref: str,
        principal_name: str,
        operations: list[str],
        justifications: list[str] | None = None,
    ) -> Grant:
        """Set what ``principal_name`` may do with the key (empty operations revoke) and
        with which justifications (default service_processing; never the escrow-only
        codes legal_request and break_glass)."""
        with self._audit.operation(caller, "grant") as op:
            caller.require(Role.ADMIN)
            grant = Grant(parse_operations(operations), parse_grant_justifications(justifications))
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                op.note(
                    key_id=key.key_id,
                    detail=f"principal={principal_name} ops={','.join(sorted(grant.operations))}"
                    f" justifications={','.join(sorted(grant.justifications))}",
                )
                grantee = tx.principal_by_name(principal_name)
                if grantee is None:
                    raise NotFound("no such principal")
                if grantee.role is not Role.SERVICE:
                    raise InvalidRequest("grants can only be given to principals with role service")
                tx.put_grant(key.key_id, grantee.id, grant)
                self._audit.append(tx, [op.ok()])
            return grant

    def set_escrow_policy(self, caller: Caller, ref: str, policy: EscrowPolicy) -> Key:
        """The quorum escrow cases over this key need; a case gets the stricter of this and
        the global default (and of every key it covers)."""
        with self._audit.operation(caller, "set_escrow_policy") as op:
            caller.require(Role.ADMIN)
            if not 1 <= policy.quorum <= 16:
                raise InvalidRequest("quorum must be between 1 and 16")
            if policy.quorum < len(policy.required_groups):
                raise InvalidRequest("quorum must be at least the number of required groups")
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                op.note(
                    key_id=key.key_id,
                    detail=f"quorum={policy.quorum} "
                    f"required={','.join(sorted(policy.required_groups))} "
                    f"veto={','.join(sorted(policy.veto_groups))}",
                )
                new = replace(key, escrow_policy=policy)
                tx.update_key(new)
                self._audit.append(tx, [op.ok()])
            return new

    def _transition(
        self,
        caller: Caller,
        ref: str,
        name: str,
        allowed_from: set[KeyState],
        to: KeyState,
        check: Callable[[], None] | None = None,
        **changes: object,
    ) -> Key:
        with self._audit.operation(caller, name) as op:
            caller.require(Role.ADMIN)
            if check is not None:
                check()
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                op.note(key_id=key.key_id)
                if key.state not in allowed_from:
                    raise KeyStateError.of(key.state.value)
                new = replace(key, state=to, **changes)  # type: ignore[arg-type]
                tx.update_key(new)
                self._audit.append(tx, [op.ok(detail=f"{key.state.value}->{to.value}")])
            return new


@dataclass
class DueRun:
    """What one scheduler run did."""

    rotated: list[tuple[str, int]] = field(default_factory=list)  # (key id, new version)
    destroyed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # done meanwhile by another process
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key id, error code)


def next_rotation(key: Key) -> datetime | None:
    """When scheduled rotation is due (None: no period, or the key is not enabled)."""
    if key.rotation_period_days is None or key.state is not KeyState.ENABLED:
        return None
    return _aware(key.rotated_at or key.created_at) + timedelta(days=key.rotation_period_days)


def is_overdue(key: Key, now: datetime) -> bool:
    due = next_rotation(key)
    return due is not None and due <= now


def _code(error: Exception) -> str:
    return error.code if isinstance(error, KmsError) else "internal_error"


def _check_min_version(key: Key, version: int) -> None:
    if version < key.min_decryption_version:
        raise InvalidRequest(
            f"min_decryption_version only moves forward (it is {key.min_decryption_version})"
        )
    if version > key.current_version:
        raise InvalidRequest(
            f"min_decryption_version cannot pass the current version ({key.current_version})"
        )


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _require_enabled(key: Key) -> None:
    """KeyStateError (409) unless the key is enabled (rotation needs it)."""
    if key.state is not KeyState.ENABLED:
        raise KeyStateError.of(key.state.value)

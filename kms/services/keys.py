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

Around the service: how a request names a key (kms/services/key_refs.py), the request
parameters and their limits (kms/services/key_params.py), and the rotation schedule
(kms/services/rotation.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from kms.errors import InvalidRequest, KeyStateError, KmsError, NotFound
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller, EventBuilder, format_time
from kms.services.change_quorum import PLAINTEXT_OPS, ChangeTx
from kms.services.changes import ChangeService
from kms.services.hsm_port import Hsm
from kms.services.key_params import (
    UNSET,
    Unset,
    check_description,
    check_escrow_policy,
    check_min_version,
    check_pending_days,
    check_rotation_period,
    parse_grant,
)
from kms.services.key_refs import check_alias, resolve
from kms.services.model import (
    EscrowPolicy,
    Grant,
    Key,
    KeyState,
    KeyUsage,
    Role,
    VersionUsage,
)
from kms.services.ports import (
    Clock,
    LifecycleRows,
    Store,
)
from kms.services.rotation import DueRun, aware, is_overdue


class KeyServiceTx(ChangeTx, LifecycleRows, Protocol):
    """The rows KeyService reads and writes."""


class KeyStore(Store[KeyServiceTx], Protocol):
    """The database as KeyService uses it: those rows, and erasing deleted material."""

    def purge_erased(self) -> None:
        """As Storage.purge_erased."""
        ...


class KeyService:
    """The key lifecycle. Every change is one audited operation, recorded in the write
    transaction that makes it."""

    def __init__(
        self,
        storage: KeyStore,
        hsm: Hsm,
        audit: AuditTrail,
        clock: Clock,
        *,
        changes: ChangeService,
    ) -> None:
        self._storage = storage
        self._hsm = hsm
        self._audit = audit
        self._clock = clock
        self._changes = changes  # dual control of grants, policies, deletion (changes.py)

    def create(self, caller: Caller, alias: str | None, description: str) -> Key:
        """A new enabled key whose version 1 was generated inside the HSM."""
        with self._audit.operation(caller, "create_key") as op:
            caller.require(Role.ADMIN)
            if alias is not None:
                check_alias(alias)
            check_description(description)
            key_id = str(uuid.uuid4())
            op.note(key_id=key_id, key_version=1)
            wrapped = self._hsm.new_wrapped_kek()
            now = self._clock.now()
            key = Key(key_id, alias, description, KeyState.ENABLED, 1, now, rotated_at=now)
            with self._storage.transaction() as tx:
                tx.add_key(key)
                tx.add_version(wrapped.as_version(key_id, 1, now))
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
        version). Nothing changes unless every given value is valid. Moving
        ``min_decryption_version`` makes stored blobs unreadable for good: a dual-control
        change (kms/services/changes.py)."""
        with self._audit.operation(caller, "configure_key") as op:
            caller.require(Role.ADMIN)
            check_rotation_period(rotation_period_days)
            params: dict[str, Any] = {
                "key": ref,
                "min_decryption_version": min_decryption_version,
                "rotation_period_days": "unchanged"
                if isinstance(rotation_period_days, Unset)
                else rotation_period_days,
            }
            gated = min_decryption_version is not None
            if gated:
                self._changes.require(caller, "retire_versions", params, key_ref=ref)
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                if gated:
                    params["key"] = key.key_id
                    self._changes.consume(tx, caller, "retire_versions", params)
                op.note(key_id=key.key_id)
                if key.state is KeyState.DESTROYED:
                    raise KeyStateError.of(key.state.value)
                new = key
                if not isinstance(rotation_period_days, Unset):
                    new = replace(new, rotation_period_days=rotation_period_days)
                if min_decryption_version is not None:
                    check_min_version(key, min_decryption_version)
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
                    VersionUsage(v, aware(made), n, last, v < key.min_decryption_version)
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
                run.failed.append((key.key_id, _code(e)))
        for key in doomed:
            try:
                if self._destroy(caller, key.key_id):
                    run.destroyed.append(key.key_id)
                else:
                    run.skipped.append(key.key_id)
            except Exception as e:  # the run goes on with the next key
                run.failed.append((key.key_id, _code(e)))
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
            tx.add_version(wrapped.as_version(key.key_id, v, now))
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
        """A dual-control change (kms/services/changes.py)."""
        return self._transition(
            caller,
            ref,
            "schedule_key_deletion",
            {KeyState.ENABLED, KeyState.DISABLED},
            KeyState.PENDING_DELETION,
            lambda: {"deletion_date": self._deletion_date(pending_days)},
            gate=("schedule_deletion", {"key": ref, "pending_days": pending_days}),
        )

    def _deletion_date(self, pending_days: int) -> datetime:
        check_pending_days(pending_days)  # before the date: an absurd count overflows it
        return self._clock.now() + timedelta(days=pending_days)

    def cancel_deletion(self, caller: Caller, ref: str) -> Key:
        return self._transition(
            caller,
            ref,
            "cancel_key_deletion",
            {KeyState.PENDING_DELETION},
            KeyState.DISABLED,
            lambda: {"deletion_date": None},
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
            grant = parse_grant(operations, justifications)
            gated = bool(grant.operations & PLAINTEXT_OPS)  # returns or unwraps material
            params: dict[str, Any] = {
                "key": ref,
                "principal": principal_name,
                "operations": sorted(grant.operations),
                "justifications": sorted(grant.justifications),
            }
            if gated:
                self._changes.require(caller, "grant", params, key_ref=ref)
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                if gated:
                    self._changes.consume(tx, caller, "grant", {**params, "key": key.key_id})
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
            check_escrow_policy(policy)
            params: dict[str, Any] = {
                "key": ref,
                "quorum": policy.quorum,
                "required_groups": sorted(policy.required_groups),
                "veto_groups": sorted(policy.veto_groups),
            }
            self._changes.require(caller, "set_escrow_policy", params, key_ref=ref)
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                self._changes.consume(
                    tx, caller, "set_escrow_policy", {**params, "key": key.key_id}
                )
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
        changes: Callable[[], dict[str, object]] = dict,
        gate: tuple[str, dict[str, Any]] | None = None,
    ) -> Key:
        """Move the key to ``to`` from one of ``allowed_from``, with ``changes()`` (which
        may refuse the request before anything is read); ``gate``: (kind, params) if
        this is a dual-control change."""
        with self._audit.operation(caller, name) as op:
            caller.require(Role.ADMIN)
            fields = changes()
            if gate is not None:
                self._changes.require(caller, gate[0], gate[1], key_ref=ref)
            with self._storage.transaction() as tx:
                key = resolve(tx, ref)
                if gate is not None:
                    self._changes.consume(tx, caller, gate[0], {**gate[1], "key": key.key_id})
                op.note(key_id=key.key_id)
                if key.state not in allowed_from:
                    raise KeyStateError.of(key.state.value)
                new = replace(key, state=to, **fields)  # type: ignore[arg-type]
                tx.update_key(new)
                self._audit.append(tx, [op.ok(detail=f"{key.state.value}->{to.value}")])
            return new


def _code(error: Exception) -> str:
    """The stable code a failed scheduled change is reported with."""
    return error.code if isinstance(error, KmsError) else "internal_error"


def _require_enabled(key: Key) -> None:
    """KeyStateError (409) unless the key is enabled (rotation needs it)."""
    if key.state is not KeyState.ENABLED:
        raise KeyStateError.of(key.state.value)

"""Key lifecycle: create, describe, rotate, enable/disable, scheduled deletion, grants.

State machine (anything else is refused with 409 ``key_state``)::

    enabled  --disable-->  disabled  --enable-->  enabled
    enabled|disabled  --schedule-deletion-->  pending_deletion
    pending_deletion  --cancel-deletion-->  disabled

Only enabled keys are used for crypto. Versions only grow; rotation adds a version generated
inside the HSM and makes it current, older versions stay usable for decryption. The HSM call
that makes a new KEK happens before the write transaction, so a failure leaves no trace but
its audit record and no half-made version.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

from kms.errors import InvalidRequest, KeyStateError, NotFound
from kms.services.audit import AuditTrail, Caller
from kms.services.model import (
    DEFAULT_JUSTIFICATION,
    ESCROW_ONLY_JUSTIFICATIONS,
    JUSTIFICATIONS,
    EscrowPolicy,
    Grant,
    Key,
    KeyState,
    KeyVersion,
    Operation,
    Role,
)
from kms.services.ports import Clock, Hsm, Storage, Tx

ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9/_.-]{0,63}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_DESCRIPTION = 1024
MIN_PENDING_DAYS, MAX_PENDING_DAYS = 7, 30


def resolve(tx: Tx, ref: str) -> Key:
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
    allowed = {o.value for o in Operation}
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
            key = Key(key_id, alias, description, KeyState.ENABLED, 1, now)
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
            require_enabled(key)
            wrapped = self._hsm.new_wrapped_kek()
            with self._storage.transaction() as tx:
                key = resolve(tx, key.key_id)  # re-read under the write lock
                require_enabled(key)
                new = replace(key, current_version=key.current_version + 1)
                tx.add_version(
                    KeyVersion(
                        key.key_id,
                        new.current_version,
                        self._clock.now(),
                        wrapped.wrapped,
                        wrapped.root_label,
                    )
                )
                tx.update_key(new)
                self._audit.append(tx, [op.ok(key_version=new.current_version)])
            return new

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


def require_enabled(key: Key) -> None:
    """KeyStateError (409) unless the key may be used."""
    if key.state is not KeyState.ENABLED:
        raise KeyStateError.of(key.state.value)

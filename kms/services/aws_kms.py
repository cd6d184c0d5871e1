"""What the AWS KMS face needs beyond KeyService and CryptoService: an alias added to an
existing key (CreateAlias) and DescribeKey, for admins, auditors and services holding a
grant on the key (a service without one gets the same refusal whether the key exists or
not: key_use.visible).

The alias table holds one alias per key: a second alias for a key is refused (AliasExists),
as is an alias that already names a key.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from kms.errors import Conflict, InvalidRequest, KeyStateError
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller
from kms.services.key_refs import ALIAS_RE, UUID_RE, resolve
from kms.services.key_use import visible
from kms.services.model import Grant, Key, KeyState, Role
from kms.services.ports import AuditRows, GrantRows, KeyRows, PrincipalRows, Store


class AliasExists(Conflict):
    code = "alias_exists"
    public_message = "the alias already exists"


class AwsKeyServiceTx(KeyRows, GrantRows, AuditRows, PrincipalRows, Protocol):
    """The rows AwsKeyService reads and writes."""


class AwsKeyService:
    def __init__(self, storage: Store[AwsKeyServiceTx], audit: AuditTrail) -> None:
        self._storage = storage
        self._audit = audit

    def describe(self, caller: Caller, ref: str) -> Key:
        """The key ``ref`` (id or alias) names, for admins and auditors (NotFound if none)
        and services that hold a grant on it (NoGrant for other services, whether or not
        the key exists). Audited as ``describe_key`` when refused, like KeyService.get."""
        with self._audit.operation(caller, "describe_key") as op:
            principal = caller.require(Role.ADMIN, Role.AUDITOR, Role.SERVICE)
            with self._storage.reader() as tx:
                is_id = UUID_RE.fullmatch(ref)
                key = tx.key_by_id(ref) if is_id else tx.key_by_alias(ref)
                grant = Grant()
                if key is not None:
                    op.note(key_id=key.key_id)
                    if principal.role is Role.SERVICE:
                        grant = tx.grant(key.key_id, principal.id)
                refusal = visible(principal.role, key, grant)
                if refusal is not None:
                    raise refusal
            assert key is not None
            return key

    def create_alias(self, caller: Caller, alias: str, key_id: str) -> Key:
        """Give the key ``key_id`` (not pending deletion or destroyed) the alias ``alias``
        (admins; audited ``create_alias``). AliasExists if the alias is taken or the key
        already has one."""
        with self._audit.operation(caller, "create_alias") as op:
            caller.require(Role.ADMIN)
            op.note(detail=f"alias={alias[:64]}")
            if not ALIAS_RE.fullmatch(alias) or UUID_RE.fullmatch(alias):
                raise InvalidRequest(
                    "alias must be 1-64 characters of letters, digits, '/', '_', '.', '-' "
                    "and must not look like a key id"
                )
            with self._storage.transaction() as tx:
                key = resolve(tx, key_id)
                op.note(key_id=key.key_id)
                if key.state in (KeyState.PENDING_DELETION, KeyState.DESTROYED):
                    raise KeyStateError.of(key.state.value)
                if key.alias is not None:
                    raise AliasExists(
                        f"the key already has the alias {key.alias!r}; "
                        "this KMS allows one alias per key"
                    )
                if tx.key_by_alias(alias) is not None:
                    raise AliasExists("an alias with this name already exists")
                try:
                    tx.set_alias(key.key_id, alias)
                except Conflict as e:  # a concurrent CreateAlias won
                    raise AliasExists("an alias with this name already exists") from e
                self._audit.append(tx, [op.ok()])
            return replace(key, alias=alias)

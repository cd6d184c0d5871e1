"""What the AWS KMS face needs beyond KeyService and CryptoService: an alias added to an
existing key (CreateAlias), DescribeKey for a service holding a grant on the key, and the
key an alias names when a service passes one as Decrypt's ``KeyId``.

The alias table holds one alias per key: a second alias for a key is refused (AliasExists),
as is an alias that already names a key.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from kms.errors import Conflict, Forbidden, InvalidRequest, KeyStateError
from kms.services.audit import AuditTrail
from kms.services.audit_events import Caller
from kms.services.key_refs import ALIAS_RE, UUID_RE, resolve
from kms.services.model import Key, KeyState, Role
from kms.services.ports import AuditRows, GrantRows, KeyRows, Store


class AliasExists(Conflict):
    code = "alias_exists"
    public_message = "the alias already exists"


class AwsKeyServiceTx(KeyRows, GrantRows, AuditRows, Protocol):
    """The rows AwsKeyService reads and writes."""


class AwsKeyService:
    def __init__(self, storage: Store[AwsKeyServiceTx], audit: AuditTrail) -> None:
        self._storage = storage
        self._audit = audit

    def describe(self, caller: Caller, ref: str) -> Key:
        """The key ``ref`` (id or alias) names, for admins, auditors, and services that
        hold a grant on it (Forbidden for other services). Audited as ``describe_key``
        when refused, like KeyService.get."""
        with self._audit.operation(caller, "describe_key") as op:
            principal = caller.require(Role.ADMIN, Role.AUDITOR, Role.SERVICE)
            with self._storage.reader() as tx:
                key = resolve(tx, ref)
                op.note(key_id=key.key_id)
                if (
                    principal.role is Role.SERVICE
                    and not tx.grant(key.key_id, principal.id).operations
                ):
                    raise Forbidden("no grant on this key", detail="no grant")
            return key

    def key_id(self, caller: Caller, ref: str) -> str:
        """The id of the key ``ref`` (id or alias) names, for a service to compare with a
        blob's key; NotFound if none. Not audited itself: the caller's operation is."""
        caller.require(Role.SERVICE)
        with self._storage.reader() as tx:
            return resolve(tx, ref).key_id

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

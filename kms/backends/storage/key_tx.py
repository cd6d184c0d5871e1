"""The keys' part of the Tx port: keys, their versions (wrapped KEKs) and aliases. Key
and version rows are sealed (kms/services/seals.py): a row written outside the server
is never used; aliases are not (an alias only names a key, whose own row is checked)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from kms.backends.storage import schema as t
from kms.backends.storage.loading import checked_rows, mechanism_name
from kms.backends.storage.times import utc, utc_or_none
from kms.errors import Conflict
from kms.services.model import EscrowPolicy, Key, KeyState, KeyVersion
from kms.services.ports import TxSeals
from kms.services.seals import key_fields, parsed, version_fields


class KeyTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def add_key(self, key: Key) -> None:
        self._c.execute(
            insert(t.keys).values(
                key_id=key.key_id,
                description=key.description,
                state=key.state.value,
                current_version=key.current_version,
                created_at=key.created_at,
                deletion_date=key.deletion_date,
                escrow_policy=_policy_json(key.escrow_policy),
                rotation_period_days=key.rotation_period_days,
                min_decryption_version=key.min_decryption_version,
                rotated_at=key.rotated_at,
                seal=self._seals.seal("key", key_fields(key)),
            )
        )
        if key.alias is not None:
            try:
                self._c.execute(insert(t.aliases).values(alias=key.alias, key_id=key.key_id))
            except sa_exc.IntegrityError as e:
                raise Conflict(f"alias {key.alias!r} is already in use") from e

    def add_version(self, version: KeyVersion) -> None:
        self._c.execute(
            insert(t.key_versions).values(
                key_id=version.key_id,
                version=version.version,
                wrapped_kek=version.wrapped,
                root_label=version.root_label,
                wrap_mechanism=version.wrap_mechanism,
                created_at=version.created_at,
                seal=self._seals.seal("key_version", version_fields(version)),
            )
        )

    def update_key(self, key: Key) -> None:
        self._c.execute(
            update(t.keys)
            .where(t.keys.c.key_id == key.key_id)
            .values(
                state=key.state.value,
                current_version=key.current_version,
                deletion_date=key.deletion_date,
                description=key.description,
                escrow_policy=_policy_json(key.escrow_policy),
                rotation_period_days=key.rotation_period_days,
                min_decryption_version=key.min_decryption_version,
                rotated_at=key.rotated_at,
                seal=self._seals.seal("key", key_fields(key)),
            )
        )

    def key_by_id(self, key_id: str) -> Key | None:
        row = parsed("key", key_id, lambda: self._c.execute(_KEY_BY_ID, {"key_id": key_id}).first())
        return self._checked_key(row) if row else None

    def key_by_alias(self, alias: str) -> Key | None:
        query = key_select().where(t.aliases.c.alias == alias)
        row = parsed("key", f"alias={alias}", lambda: self._c.execute(query).first())
        return self._checked_key(row) if row else None

    def list_keys(self) -> list[Key]:
        """Every key whose row verifies (the others are alarmed and left out)."""
        return self.verified_keys(key_select().order_by(t.keys.c.created_at))

    def verified_keys(self, stmt: Any) -> list[Key]:
        """The keys of a key_select() statement whose rows load and verify."""
        return checked_rows(self._c, stmt, t.keys.c.key_id, "key", self._checked_key)

    def key_version(self, key_id: str, version: int) -> KeyVersion | None:
        row = self._c.execute(_KEY_VERSION, {"key_id": key_id, "version": version}).first()
        if row is None:
            return None
        found = parsed(
            "key_version",
            f"{key_id},{version}",
            lambda: version_row(row),
        )
        self._seals.check("key_version", version_fields(found), row.seal)
        return found

    def _checked_key(self, row: Any) -> Key:
        """The key of a row, SealBroken if the row does not parse or verify."""
        key = parsed("key", row.key_id, lambda: key_row(row))
        self._seals.check("key", key_fields(key), row.seal)
        return key


def version_row(row: Any) -> KeyVersion:
    """The KeyVersion of a key_versions row (not checked: see KeyTx.key_version)."""
    return KeyVersion(
        key_id=row.key_id,
        version=row.version,
        created_at=utc(row.created_at),
        wrapped=bytes(row.wrapped_kek),
        root_label=row.root_label,
        wrap_mechanism=mechanism_name(row.wrap_mechanism),
    )


def key_select() -> Any:
    """Keys with their alias (None if they have none), for key_row()."""
    return select(t.keys, t.aliases.c.alias).outerjoin(
        t.aliases, t.aliases.c.key_id == t.keys.c.key_id
    )


def key_row(row: Any) -> Key:
    """The Key of a row selected by key_select() (or anything with its columns as
    attributes, times as datetimes)."""
    return Key(
        key_id=row.key_id,
        alias=row.alias,
        description=row.description,
        state=KeyState(row.state),
        current_version=row.current_version,
        created_at=utc(row.created_at),
        deletion_date=utc_or_none(row.deletion_date),
        escrow_policy=_policy(row.escrow_policy),
        rotation_period_days=row.rotation_period_days,
        min_decryption_version=row.min_decryption_version,
        rotated_at=utc_or_none(row.rotated_at),
    )


def _policy_json(policy: EscrowPolicy | None) -> str | None:
    if policy is None:
        return None
    return json.dumps(
        {
            "quorum": policy.quorum,
            "required_groups": sorted(policy.required_groups),
            "veto_groups": sorted(policy.veto_groups),
        }
    )


def _policy(text: str | None) -> EscrowPolicy | None:
    if text is None:
        return None
    data = json.loads(text)
    return EscrowPolicy(
        data["quorum"], frozenset(data["required_groups"]), frozenset(data["veto_groups"])
    )


# Statements of the crypto hot path, built once (building a statement per call costs more
# than running it on SQLite).
_KEY_BY_ID = key_select().where(t.keys.c.key_id == bindparam("key_id"))
_KEY_VERSION = select(t.key_versions).where(
    t.key_versions.c.key_id == bindparam("key_id"),
    t.key_versions.c.version == bindparam("version"),
)

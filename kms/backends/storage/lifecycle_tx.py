"""The key-lifecycle part of the Tx port: keys by state, usage counted from the audit
trail, and the erasure of a key's material (crypto-shredding)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection

from kms.backends.storage import schema as t
from kms.backends.storage.key_tx import key_select
from kms.backends.storage.times import utc
from kms.formats.state import ident
from kms.services.model import Key, KeyState, UsageDay
from kms.services.ports import TxSeals

# Audit records that mean "a blob under this version was opened".
_USE = ("decrypt", "rewrap", "xks_decrypt")


class LifecycleTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals
    verified_keys: Callable[[Any], list[Key]]  # KeyTx's

    def keys_in_states(self, states: Sequence[KeyState]) -> list[Key]:
        """Keys in ``states`` whose rows verify: a key set to pending deletion in the
        database is never deleted."""
        stmt = key_select().where(t.keys.c.state.in_([s.value for s in states]))
        return self.verified_keys(stmt.order_by(t.keys.c.created_at))

    def version_usage(self, key_id: str) -> list[tuple[int, datetime, int, str | None]]:
        """(version, created_at, successful uses, time of the last one) per version still
        held, oldest version first."""
        r = t.audit_records.c
        uses = (
            select(
                r.key_version.label("version"),
                func.count().label("n"),
                func.max(r.time).label("last"),
            )
            .where(r.key_id == key_id, r.operation.in_(_USE), r.outcome == "ok")
            .group_by(r.key_version)
            .subquery()
        )
        v = t.key_versions.c
        rows = self._c.execute(
            select(v.version, v.created_at, uses.c.n, uses.c.last)
            .outerjoin(uses, uses.c.version == v.version)
            .where(v.key_id == key_id)
            .order_by(v.version)
        )
        return [(row.version, utc(row.created_at), int(row.n or 0), row.last) for row in rows]

    def usage_by_day(self, key_id: str, since: str) -> list[UsageDay]:
        """Successful uses per UTC day and version from ``since`` (a record time), oldest
        day first."""
        r = t.audit_records.c
        day = func.substr(r.time, 1, 10)
        rows = self._c.execute(
            select(day.label("day"), r.key_version, func.count().label("n"))
            .where(
                r.key_id == key_id,
                r.operation.in_(_USE),
                r.outcome == "ok",
                r.time >= since,
            )
            .group_by(day, r.key_version)
            .order_by(day, r.key_version)
        )
        return [UsageDay(row.day, int(row.key_version), int(row.n)) for row in rows]

    def destroy_versions(self, key_id: str) -> int:
        """Delete every version row of the key (its wrapped KEK material); the count.
        On SQLite, ``secure_delete`` (set on every connection) zeroes the freed bytes."""
        v = t.key_versions.c
        for (version,) in self._c.execute(select(v.version).where(v.key_id == key_id)):
            self._seals.wrote("key_version", ident([key_id, int(version)]), None)
        stmt = delete(t.key_versions).where(v.key_id == key_id)
        return int(self._c.execute(stmt).rowcount)

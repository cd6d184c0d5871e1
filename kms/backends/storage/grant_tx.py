"""The grants' part of the Tx port: what each principal may do with each key. Grant rows
are sealed (kms/services/seals.py): one written outside the server is never used."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from kms.backends.storage import prepared
from kms.backends.storage import schema as t
from kms.backends.storage.key_tx import key_row
from kms.errors import SealBroken
from kms.services.model import Grant, Key, KeyAccess
from kms.services.ports import TxSeals
from kms.services.seals import grant_fields, key_fields, parsed


class GrantTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def put_grant(self, key_id: str, principal_id: int, grant: Grant) -> None:
        values = {
            "operations": ",".join(sorted(grant.operations)),
            "justifications": ",".join(sorted(grant.justifications)),
            "seal": self._seals.seal("grant", grant_fields(key_id, principal_id, grant)),
        }
        where = (t.grants.c.key_id == key_id, t.grants.c.principal_id == principal_id)
        if self._c.execute(select(t.grants.c.key_id).where(*where)).first():
            self._c.execute(update(t.grants).where(*where).values(**values))
        else:
            self._c.execute(
                insert(t.grants).values(key_id=key_id, principal_id=principal_id, **values)
            )

    def key_access(self, key_id: str, principal_id: int) -> KeyAccess | None:
        """On the DBAPI cursor (prepared.KEY_ACCESS): it runs in every audited request's
        write transaction. Times come back as text on SQLite; key_row wants datetimes."""
        rows = prepared.KEY_ACCESS.rows(self._c, {"key_id": key_id, "principal_id": principal_id})
        if not rows:
            return None
        found = dict(zip(prepared.KEY_ACCESS_COLUMNS, rows[0], strict=True))
        key = parsed("key", key_id, lambda: _access_key(found))
        self._seals.check("key", key_fields(key), found["seal"])
        ops, codes = found["operations"], found["justifications"]
        if ops is None:
            return KeyAccess(key, Grant())
        try:  # a grant row: it must verify, or it is no grant (with the reason why)
            ident = f"{key_id},{principal_id}"
            grant = parsed("grant", ident, lambda: Grant(split_list(ops), split_list(codes)))
            fields = grant_fields(key_id, principal_id, grant)
            self._seals.check("grant", fields, found["grant_seal"])
        except SealBroken as e:
            return KeyAccess(key, Grant(), broken_grant=e.detail)
        return KeyAccess(key, grant)

    def grant(self, key_id: str, principal_id: int) -> Grant:
        row = self._c.execute(_GRANT, {"key_id": key_id, "principal_id": principal_id}).first()
        if row is None:
            return Grant()
        ident = f"{key_id},{principal_id}"
        grant = parsed(
            "grant",
            ident,
            lambda: Grant(split_list(row.operations), split_list(row.justifications)),
        )
        self._seals.check("grant", grant_fields(key_id, principal_id, grant), row.seal)
        return grant


def _access_key(found: dict[str, Any]) -> Key:
    """The key of a KEY_ACCESS row (times come back as text on SQLite)."""
    for name in ("created_at", "deletion_date", "rotated_at"):
        if isinstance(found[name], str):
            found[name] = datetime.fromisoformat(found[name])
    return key_row(SimpleNamespace(**found))


def split_list(text: str | None) -> frozenset[str]:
    """The codes of a comma-separated column (grants.operations, .justifications)."""
    return frozenset(x for x in (text or "").split(",") if x)


# Built once: a statement of the crypto hot path (see key_tx._KEY_BY_ID).
_GRANT = select(t.grants.c.operations, t.grants.c.justifications, t.grants.c.seal).where(
    t.grants.c.key_id == bindparam("key_id"),
    t.grants.c.principal_id == bindparam("principal_id"),
)

"""The grants' part of the Tx port: what each principal may do with each key."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from kms.backends.storage import prepared
from kms.backends.storage import schema as t
from kms.backends.storage.key_tx import key_row
from kms.services.model import Grant, KeyAccess


class GrantTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection

    def put_grant(self, key_id: str, principal_id: int, grant: Grant) -> None:
        values = {
            "operations": ",".join(sorted(grant.operations)),
            "justifications": ",".join(sorted(grant.justifications)),
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
        for name in ("created_at", "deletion_date", "rotated_at"):
            if isinstance(found[name], str):
                found[name] = datetime.fromisoformat(found[name])
        ops, codes = found["operations"], found["justifications"]
        grant = Grant(_split(ops), _split(codes)) if ops else Grant()
        return KeyAccess(key_row(SimpleNamespace(**found)), grant)

    def grant(self, key_id: str, principal_id: int) -> Grant:
        row = self._c.execute(_GRANT, {"key_id": key_id, "principal_id": principal_id}).first()
        if row is None:
            return Grant()
        return Grant(_split(row.operations), _split(row.justifications))


def _split(text: str | None) -> frozenset[str]:
    return frozenset(x for x in (text or "").split(",") if x)


# Built once: a statement of the crypto hot path (see key_tx._KEY_BY_ID).
_GRANT = select(t.grants.c.operations, t.grants.c.justifications).where(
    t.grants.c.key_id == bindparam("key_id"),
    t.grants.c.principal_id == bindparam("principal_id"),
)

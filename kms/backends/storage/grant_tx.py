"""The grants' part of the Tx port: what each principal may do with each key."""

from __future__ import annotations

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from kms.backends.storage import schema as t
from kms.backends.storage.key_tx import key_row, key_select
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
        row = self._c.execute(_KEY_ACCESS, {"key_id": key_id, "principal_id": principal_id})
        found = row.first()
        if found is None:
            return None
        ops, codes = found.operations, found.justifications
        return KeyAccess(key_row(found), Grant(_split(ops), _split(codes)) if ops else Grant())

    def grant(self, key_id: str, principal_id: int) -> Grant:
        row = self._c.execute(_GRANT, {"key_id": key_id, "principal_id": principal_id}).first()
        if row is None:
            return Grant()
        return Grant(_split(row.operations), _split(row.justifications))


def _split(text: str | None) -> frozenset[str]:
    return frozenset(x for x in (text or "").split(",") if x)


# Built once: statements of the crypto hot path (see key_tx._KEY_BY_ID).
_KEY_ACCESS = (
    key_select()
    .add_columns(t.grants.c.operations, t.grants.c.justifications)
    .outerjoin(
        t.grants,
        (t.grants.c.key_id == t.keys.c.key_id)
        & (t.grants.c.principal_id == bindparam("principal_id")),
    )
    .where(t.keys.c.key_id == bindparam("key_id"))
)
_GRANT = select(t.grants.c.operations, t.grants.c.justifications).where(
    t.grants.c.key_id == bindparam("key_id"),
    t.grants.c.principal_id == bindparam("principal_id"),
)

"""The principals' part of the Tx port: principals and the hashes of their tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Row

from kms.backends.storage import schema as t
from kms.backends.storage.times import utc
from kms.errors import Conflict
from kms.services.model import Principal, Role


class PrincipalTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection

    def add_principal(self, name: str, role: Role, token_hash: str, now: datetime) -> Principal:
        try:
            pid = self._c.execute(
                insert(t.principals).values(name=name, role=role.value, created_at=now)
            ).inserted_primary_key[0]  # type: ignore[index]
        except sa_exc.IntegrityError as e:
            raise Conflict(f"a principal named {name!r} already exists") from e
        self._c.execute(
            insert(t.tokens).values(token_sha256=token_hash, principal_id=pid, created_at=now)
        )
        return Principal(int(pid), name, role, now)

    def principal_by_token_hash(self, token_hash: str) -> Principal | None:
        row = self._c.execute(
            select(t.principals)
            .join(t.tokens, t.tokens.c.principal_id == t.principals.c.id)
            .where(t.tokens.c.token_sha256 == token_hash)
        ).first()
        return _principal(row) if row else None

    def principal_by_name(self, name: str) -> Principal | None:
        row = self._c.execute(select(t.principals).where(t.principals.c.name == name)).first()
        return _principal(row) if row else None

    def list_principals(self) -> list[Principal]:
        rows = self._c.execute(select(t.principals).order_by(t.principals.c.id))
        return [_principal(r) for r in rows]


def _principal(row: Row[Any]) -> Principal:
    return Principal(int(row.id), row.name, Role(row.role), utc(row.created_at))

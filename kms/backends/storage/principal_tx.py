"""The principals' part of the Tx port: principals and the hashes of their tokens, both
sealed (kms/services/seals.py): a principal or token row written outside the server is
never used."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Row

from kms.backends.storage import schema as t
from kms.backends.storage.loading import checked_rows
from kms.backends.storage.times import utc
from kms.errors import Conflict
from kms.services.model import Principal, Role
from kms.services.ports import TxSeals
from kms.services.seals import parsed, principal_fields, token_fields


class PrincipalTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def add_principal(self, name: str, role: Role, token_hash: str, now: datetime) -> Principal:
        try:
            pid = self._c.execute(
                insert(t.principals).values(name=name, role=role.value, created_at=now)
            ).inserted_primary_key[0]  # type: ignore[index]
        except sa_exc.IntegrityError as e:
            raise Conflict(f"a principal named {name!r} already exists") from e
        principal = Principal(int(pid), name, role, now)
        # sealed once the id is known: the seal binds the row's identity too
        seal = self._seals.seal("principal", principal_fields(principal))
        self._c.execute(update(t.principals).where(t.principals.c.id == pid).values(seal=seal))
        self._c.execute(
            insert(t.tokens).values(
                token_sha256=token_hash,
                principal_id=pid,
                created_at=now,
                seal=self._seals.seal("token", token_fields(token_hash, int(pid))),
            )
        )
        return principal

    def principal_by_token_hash(self, token_hash: str) -> Principal | None:
        """The token's principal; SealBroken if the token or principal row fails its seal."""
        query = partial(self._c.execute, _BY_TOKEN, {"token_sha256": token_hash})
        row = parsed("token", "of this request", lambda: query().first())
        if row is None:
            return None
        principal = self._checked_principal(row)
        self._seals.check("token", token_fields(token_hash, principal.id), row.token_seal)
        return principal

    def principal_by_name(self, name: str) -> Principal | None:
        query = select(t.principals).where(t.principals.c.name == name)
        row = parsed("principal", name, lambda: self._c.execute(query).first())
        return self._checked_principal(row) if row else None

    def list_principals(self) -> list[Principal]:
        """Every principal whose row verifies (the others are alarmed and left out)."""
        query = select(t.principals).order_by(t.principals.c.id)
        p = t.principals.c
        return checked_rows(self._c, query, p.id, "principal", self._checked_principal)

    def principal_count(self) -> int:
        return int(self._c.execute(select(func.count()).select_from(t.principals)).scalar_one())

    def _checked_principal(self, row: Row[Any]) -> Principal:
        """The principal of a row; SealBroken if it does not parse or verify."""
        principal = parsed("principal", row.id, lambda: principal_row(row))
        self._seals.check("principal", principal_fields(principal), row.seal)
        return principal


def principal_row(row: Row[Any]) -> Principal:
    """The Principal of a principals row (not checked: see _checked_principal)."""
    return Principal(int(row.id), row.name, Role(row.role), utc(row.created_at))


_BY_TOKEN = (
    select(t.principals, t.tokens.c.seal.label("token_seal"))
    .join(t.tokens, t.tokens.c.principal_id == t.principals.c.id)
    .where(t.tokens.c.token_sha256 == bindparam("token_sha256"))
)

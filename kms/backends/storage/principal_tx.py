"""The principals' part of the Tx port: principals and the hashes of their tokens, both
sealed (kms/services/seals.py): a principal or token row written outside the server is
never used."""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Row

from kms.backends.storage import schema as t
from kms.backends.storage.loading import checked_rows
from kms.backends.storage.times import utc, utc_or_none
from kms.errors import Conflict
from kms.formats.state import ident
from kms.services.model import Principal, Role, Token
from kms.services.ports import TxSeals
from kms.services.seals import parsed, principal_fields, token_fields


class PrincipalTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def add_principal(
        self,
        name: str,
        role: Role,
        token_hash: str,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> Principal:
        try:
            pid = self._c.execute(
                insert(t.principals).values(name=name, role=role.value, created_at=now)
            ).inserted_primary_key[0]  # type: ignore[index]
        except sa_exc.IntegrityError as e:
            raise Conflict(f"a principal named {name!r} already exists") from e
        principal = Principal(int(pid), name, role, now)
        # an id the anchored state still holds belonged to a row deleted in the database:
        # its tokens, grants and credentials (sealed with the id) must not pass to this one
        self._seals.absent("principal", ident([principal.id]))
        # sealed once the id is known: the seal binds the row's identity too
        seal = self._seals.seal("principal", principal_fields(principal))
        self._c.execute(update(t.principals).where(t.principals.c.id == pid).values(seal=seal))
        self.add_token(principal.id, token_hash, now, expires_at)
        return principal

    def update_principal(self, principal: Principal) -> None:
        """Write the lifecycle fields (disabled_at, sessions_since) of ``principal``,
        sealed; its identity and role never change."""
        fields = principal_fields(principal)
        self._c.execute(
            update(t.principals)
            .where(t.principals.c.id == principal.id)
            .values(
                disabled_at=principal.disabled_at,
                sessions_since=principal.sessions_since,
                seal=self._seals.seal("principal", fields),
            )
        )

    def add_token(
        self, principal_id: int, token_hash: str, now: datetime, expires_at: datetime | None
    ) -> None:
        self._c.execute(
            insert(t.tokens).values(
                token_sha256=token_hash,
                principal_id=principal_id,
                created_at=now,
                expires_at=expires_at,
                seal=self._seals.seal("token", token_fields(token_hash, principal_id, expires_at)),
            )
        )

    def token_holder(self, token_hash: str) -> tuple[Principal, Token] | None:
        """The token and its principal; SealBroken if either row fails its seal."""
        query = partial(self._c.execute, _BY_TOKEN, {"token_sha256": token_hash})
        row = parsed("token", "of this request", lambda: query().first())
        if row is None:
            return None
        principal = self._checked_principal(row)
        token = self._checked_token(row, token_hash)
        return principal, token

    def tokens_of(self, principal_id: int) -> list[tuple[str, Token]]:
        """Every token of the principal whose row verifies, with its full hash, oldest
        first (the others are alarmed and left out)."""
        k = t.tokens.c
        query = select(t.tokens).where(k.principal_id == principal_id).order_by(k.created_at)
        return checked_rows(
            self._c,
            query,
            k.token_sha256,
            "token",
            lambda row: (row.token_sha256, self._checked_token(row, row.token_sha256)),
        )

    def token_hashes(self, principal_id: int) -> list[str]:
        k = t.tokens.c
        query = select(k.token_sha256).where(k.principal_id == principal_id)
        return [str(x) for x in self._c.execute(query).scalars()]

    def set_token_rotated(
        self, token_hash: str, principal_id: int, expires_at: datetime, rotated_at: datetime
    ) -> None:
        fields = token_fields(token_hash, principal_id, expires_at, rotated_at)
        self._c.execute(
            update(t.tokens)
            .where(t.tokens.c.token_sha256 == token_hash)
            .values(
                expires_at=expires_at,
                rotated_at=rotated_at,
                seal=self._seals.seal("token", fields),
            )
        )

    def delete_token(self, token_hash: str, principal_id: int) -> None:
        self._seals.wrote("token", ident([token_hash]), None)
        self._c.execute(delete(t.tokens).where(t.tokens.c.token_sha256 == token_hash))

    def touch_token(self, token_hash: str, now: datetime) -> None:
        """Note the token's last use (an unsealed, informational column)."""
        self._c.execute(
            update(t.tokens).where(t.tokens.c.token_sha256 == token_hash).values(last_used_at=now)
        )

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

    def _checked_token(self, row: Row[Any], token_hash: str) -> Token:
        token = parsed("token", token_hash[:16], lambda: token_row(row))
        fields = token_fields(token_hash, token.principal_id, token.expires_at, token.rotated_at)
        seal = row.token_seal if "token_seal" in row._fields else row.seal
        self._seals.check("token", fields, seal)
        return token


def principal_row(row: Row[Any]) -> Principal:
    """The Principal of a principals row (not checked: see _checked_principal)."""
    return Principal(
        int(row.id),
        row.name,
        Role(row.role),
        utc(row.created_at),
        utc_or_none(row.disabled_at),
        utc_or_none(row.sessions_since),
    )


def token_row(row: Row[Any]) -> Token:
    """The Token of a tokens row, or of _BY_TOKEN's (not checked: see _checked_token)."""
    token_hash = str(row.token_sha256)
    return Token(
        token_hash[:16],
        int(row.token_principal_id if "token_principal_id" in row._fields else row.principal_id),
        utc(row.token_created_at if "token_created_at" in row._fields else row.created_at),
        utc_or_none(row.expires_at),
        utc_or_none(row.last_used_at),
        utc_or_none(row.rotated_at),
    )


_BY_TOKEN = (
    select(
        t.principals,
        t.tokens.c.token_sha256,
        t.tokens.c.principal_id.label("token_principal_id"),
        t.tokens.c.created_at.label("token_created_at"),
        t.tokens.c.expires_at,
        t.tokens.c.rotated_at,
        t.tokens.c.last_used_at,
        t.tokens.c.seal.label("token_seal"),
    )
    .join(t.tokens, t.tokens.c.principal_id == t.principals.c.id)
    .where(t.tokens.c.token_sha256 == bindparam("token_sha256"))
)

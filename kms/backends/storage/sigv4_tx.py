"""The SigV4 credential table's part of the Tx port, and the replay nonce store."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Row

from kms.backends.storage import prepared
from kms.backends.storage import schema as t
from kms.backends.storage.times import utc
from kms.services.model import Principal, Role, SigV4Credential


class SigV4Tx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection

    def add_sigv4_credential(self, credential: SigV4Credential) -> None:
        self._c.execute(
            insert(t.sigv4_credentials).values(
                access_key_id=credential.access_key_id,
                principal_id=credential.principal.id,
                sealed_secret=credential.sealed_secret,
                wrapped_kek=credential.wrapped_kek,
                root_label=credential.root_label,
                state=credential.state,
                created_at=credential.created_at,
            )
        )

    def sigv4_credential(self, access_key_id: str) -> SigV4Credential | None:
        row = self._c.execute(_SELECT.where(t.sigv4_credentials.c.access_key_id == access_key_id))
        first = row.first()
        return _credential(first) if first else None

    def sigv4_credentials_of(self, principal_id: int) -> list[SigV4Credential]:
        c = t.sigv4_credentials.c
        rows = self._c.execute(_SELECT.where(c.principal_id == principal_id).order_by(c.created_at))
        return [_credential(r) for r in rows]

    def set_sigv4_state(self, access_key_id: str, state: str) -> None:
        c = t.sigv4_credentials.c
        self._c.execute(
            update(t.sigv4_credentials).where(c.access_key_id == access_key_id).values(state=state)
        )

    def remember_nonce(self, nonce: str, expires_at: str, now: str) -> bool:
        """Record ``nonce`` until ``expires_at``; False if it is recorded and not expired
        at ``now``. One statement: a concurrent writer of the same nonce waits for this
        transaction, then finds it recorded."""
        params = {"nonce": nonce, "expires_at": expires_at, "now": now}
        return prepared.NONCE_REMEMBER.count(self._c, params) == 1

    def prune_nonces(self, now: str, limit: int) -> int:
        """Delete up to ``limit`` nonces expired at ``now``; how many."""
        n = t.sigv4_nonces.c
        expired = select(n.nonce).where(n.expires_at < now).limit(limit)
        return self._c.execute(delete(t.sigv4_nonces).where(n.nonce.in_(expired))).rowcount


_SELECT = select(
    t.sigv4_credentials,
    t.principals.c.name,
    t.principals.c.role,
    t.principals.c.created_at.label("principal_created_at"),
).join(t.principals, t.principals.c.id == t.sigv4_credentials.c.principal_id)


def _credential(row: Row[Any]) -> SigV4Credential:
    created = utc(row.principal_created_at)
    return SigV4Credential(
        access_key_id=row.access_key_id,
        principal=Principal(int(row.principal_id), row.name, Role(row.role), created),
        sealed_secret=bytes(row.sealed_secret),
        wrapped_kek=bytes(row.wrapped_kek),
        root_label=row.root_label,
        state=row.state,
        created_at=row.created_at,
    )

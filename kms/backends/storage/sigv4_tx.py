"""The SigV4 credential table's part of the Tx port, and the replay nonce store.
Credential rows are sealed, as is the principal row each one joins (kms/services/seals.py):
a credential written, revived or re-pointed outside the server is never used."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Row

from kms.backends.storage import prepared
from kms.backends.storage import schema as t
from kms.backends.storage.loading import checked_rows, mechanism_name
from kms.backends.storage.times import utc, utc_or_none
from kms.services.model import Principal, Role, SigV4Credential
from kms.services.ports import TxSeals
from kms.services.seals import parsed, principal_fields, sigv4_fields


class SigV4Tx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def add_sigv4_credential(self, credential: SigV4Credential) -> None:
        self._c.execute(
            insert(t.sigv4_credentials).values(
                access_key_id=credential.access_key_id,
                principal_id=credential.principal.id,
                sealed_secret=credential.sealed_secret,
                wrapped_kek=credential.wrapped_kek,
                root_label=credential.root_label,
                wrap_mechanism=credential.wrap_mechanism,
                state=credential.state,
                created_at=credential.created_at,
                seal=self._seals.seal("sigv4_credential", sigv4_fields(credential)),
            )
        )

    def sigv4_credential(self, access_key_id: str) -> SigV4Credential | None:
        row = self._c.execute(
            CREDENTIAL_SELECT.where(t.sigv4_credentials.c.access_key_id == access_key_id)
        )
        first = row.first()
        return None if first is None else self._checked_credential(first)

    def sigv4_credentials_of(self, principal_id: int) -> list[SigV4Credential]:
        """The principal's credentials whose rows verify (the others are alarmed, left out)."""
        c = t.sigv4_credentials.c
        query = CREDENTIAL_SELECT.where(c.principal_id == principal_id).order_by(c.created_at)
        check = self._checked_credential
        return checked_rows(self._c, query, c.access_key_id, "sigv4_credential", check)

    def _checked_credential(self, row: Row[Any]) -> SigV4Credential:
        """The credential of a row with its principal; SealBroken unless both parse and
        verify."""
        credential = parsed("sigv4_credential", row.access_key_id, lambda: credential_row(row))
        self._seals.check("principal", principal_fields(credential.principal), row.principal_seal)
        self._seals.check("sigv4_credential", sigv4_fields(credential), row.seal)
        return credential

    def set_sigv4_state(self, access_key_id: str, state: str) -> None:
        """Change a credential's state and seal it anew; SealBroken if its row fails."""
        credential = self.sigv4_credential(access_key_id)
        if credential is None:
            return
        seal = self._seals.seal("sigv4_credential", sigv4_fields(replace(credential, state=state)))
        c = t.sigv4_credentials.c
        self._c.execute(
            update(t.sigv4_credentials)
            .where(c.access_key_id == access_key_id)
            .values(state=state, seal=seal)
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


CREDENTIAL_SELECT = select(
    t.sigv4_credentials,
    t.principals.c.name,
    t.principals.c.role,
    t.principals.c.created_at.label("principal_created_at"),
    t.principals.c.seal.label("principal_seal"),
    t.principals.c.disabled_at,
    t.principals.c.sessions_since,
).join(t.principals, t.principals.c.id == t.sigv4_credentials.c.principal_id)


def credential_row(row: Row[Any]) -> SigV4Credential:
    """The credential of a CREDENTIAL_SELECT row (not checked: see _checked_credential)."""
    created = utc(row.principal_created_at)
    return SigV4Credential(
        access_key_id=row.access_key_id,
        principal=Principal(
            int(row.principal_id),
            row.name,
            Role(row.role),
            created,
            utc_or_none(row.disabled_at),
            utc_or_none(row.sessions_since),
        ),
        sealed_secret=bytes(row.sealed_secret),
        wrapped_kek=bytes(row.wrapped_kek),
        root_label=row.root_label,
        state=row.state,
        created_at=row.created_at,
        wrap_mechanism=mechanism_name(row.wrap_mechanism),
    )

"""Sealing the rows a database made before row seals existed (migration 0009 adds the
``seal`` columns; a migration cannot reach the HSM, so ``kms init`` and ``kms migrate``
call seal_unsealed() once the schema is current).

This trusts the rows as they are found at that moment: it is the one step that turns
unsealed rows into sealed ones, it runs only from those operator commands, and the
command records how many rows of each kind it sealed in the audit trail.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Table, select, update
from sqlalchemy.engine import Connection

from kms.backends.storage import schema as t
from kms.backends.storage.grant_tx import split_list
from kms.backends.storage.key_tx import key_row, key_select, version_row
from kms.backends.storage.principal_tx import principal_row
from kms.backends.storage.sigv4_tx import CREDENTIAL_SELECT, credential_row
from kms.backends.storage.times import utc_or_none
from kms.backends.storage.xks_tx import xks_policy_row
from kms.services.model import Grant
from kms.services.ports import TxSeals
from kms.services.seals import (
    grant_fields,
    key_fields,
    principal_fields,
    sigv4_fields,
    token_fields,
    version_fields,
    xks_policy_fields,
)


class SealTx:
    """Mixed into SqlTx; ``_c`` is the transaction's connection."""

    _c: Connection
    _seals: TxSeals

    def seal_unsealed(self) -> dict[str, int]:
        """Seal every row whose seal is NULL; how many of each kind were sealed."""
        counts: dict[str, int] = {}

        def put(
            kind: str, table: Table, where: ColumnElement[bool], fields: dict[str, Any]
        ) -> None:
            seal = self._seals.seal(kind, fields)
            self._c.execute(update(table).where(where).values(seal=seal))
            counts[kind] = counts.get(kind, 0) + 1

        p, k, g = t.principals.c, t.keys.c, t.grants.c
        for row in self._c.execute(select(t.principals).where(p.seal.is_(None))).all():
            put("principal", t.principals, p.id == row.id, principal_fields(principal_row(row)))
        tok = t.tokens.c
        for row in self._c.execute(select(t.tokens).where(tok.seal.is_(None))).all():
            expires, rotated = utc_or_none(row.expires_at), utc_or_none(row.rotated_at)
            fields = token_fields(row.token_sha256, int(row.principal_id), expires, rotated)
            put("token", t.tokens, tok.token_sha256 == row.token_sha256, fields)
        for row in self._c.execute(key_select().where(k.seal.is_(None))).all():
            put("key", t.keys, k.key_id == row.key_id, key_fields(key_row(row)))
        v = t.key_versions.c
        for row in self._c.execute(select(t.key_versions).where(v.seal.is_(None))).all():
            version = version_row(row)
            where = (v.key_id == row.key_id) & (v.version == row.version)
            put("key_version", t.key_versions, where, version_fields(version))
        for row in self._c.execute(select(t.grants).where(g.seal.is_(None))).all():
            grant = Grant(split_list(row.operations), split_list(row.justifications))
            where = (g.key_id == row.key_id) & (g.principal_id == row.principal_id)
            put("grant", t.grants, where, grant_fields(row.key_id, row.principal_id, grant))
        s = t.sigv4_credentials.c
        for row in self._c.execute(CREDENTIAL_SELECT.where(s.seal.is_(None))).all():
            credential = credential_row(row)
            where = s.access_key_id == row.access_key_id
            put("sigv4_credential", t.sigv4_credentials, where, sigv4_fields(credential))
        x = t.xks_key_policies.c
        for row in self._c.execute(select(t.xks_key_policies).where(x.seal.is_(None))).all():
            fields = xks_policy_fields(row.key_id, xks_policy_row(row))
            put("xks_policy", t.xks_key_policies, x.key_id == row.key_id, fields)
        return counts

"""Statements of the request hot path, compiled once per database and run on the DBAPI
cursor of the caller's transaction.

Every audited request runs these in its write transaction: the commit-time re-check of
key state and grant, the audit head read, the record insert and the head move. Through
SQLAlchemy's executor each would spend several times longer in Python (cache key,
parameter and result processing, events) than in the database itself; run here they cost
about what the database does. ``run_on_cursor`` runs plain SQL the same way: the
``BEGIN`` that opens every SQLite transaction.

Only for statements whose parameters and result columns are plain strings and integers,
so that no type conversion is skipped, or whose caller converts the rest itself
(KEY_ACCESS: its times, in grant_tx.key_access). A database error is re-raised as SQLAlchemy's
DBAPIError (the storage layer turns it into StorageUnavailable), after the connection is
invalidated. This bypasses the engine's own error handling, which would tell a lost
connection from a refused statement. Errors here are rare, so a reconnect is cheaper than
being wrong about which connections are still good: a connection that failed is never
handed out again, and its transaction goes with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, insert, literal_column, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.expression import Executable

from kms.backends.storage import schema as t


class Prepared:
    """One Core statement, compiled on first use for each dialect."""

    def __init__(self, statement: Executable) -> None:
        self._statement = statement
        self._compiled: dict[tuple[str, str], tuple[str, Sequence[str] | None]] = {}

    def _for(self, dialect: Dialect) -> tuple[str, Sequence[str] | None]:
        ident = (dialect.name, dialect.paramstyle)
        found = self._compiled.get(ident)
        if found is None:
            compiled = self._statement.compile(dialect=dialect)  # type: ignore[attr-defined]
            order = compiled.positiontup if compiled.positional else None
            found = self._compiled[ident] = (str(compiled), order)
        return found

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Execute with ``params`` and return every row as a tuple of the selected columns
        (empty for statements that return nothing)."""
        return self._run(conn, [params], fetch=True)[0]

    def execute(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per mapping in ``params`` (one executemany for several)."""
        self._run(conn, params, fetch=False)

    def count(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Execute once with ``params``; how many rows it changed."""
        return self._run(conn, [params], fetch=False, counted=True)[1]

    def _run(
        self,
        conn: Connection,
        params: Sequence[Mapping[str, Any]],
        fetch: bool,
        counted: bool = False,
    ) -> tuple[list[tuple[Any, ...]], int]:
        sql, order = self._for(conn.dialect)
        args: list[Any] = [
            tuple(p[name] for name in order) if order is not None else p for p in params
        ]
        return _on_cursor(conn, sql, args, fetch, counted)


def run_on_cursor(
    conn: Connection, sql: str, args: Sequence[Any] = ((),), fetch: bool = False
) -> list[tuple[Any, ...]]:
    """Execute ``sql`` once per parameter set in ``args`` on ``conn``'s DBAPI cursor (one
    executemany for several); every row as a tuple if ``fetch``. A database error
    invalidates ``conn`` and is raised as DBAPIError (see the module docstring)."""
    return _on_cursor(conn, sql, args, fetch, False)[0]


def _on_cursor(
    conn: Connection, sql: str, args: Sequence[Any], fetch: bool, counted: bool
) -> tuple[list[tuple[Any, ...]], int]:
    dbapi = conn.dialect.loaded_dbapi
    cursor = None
    try:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        if len(args) == 1:
            cursor.execute(sql, args[0])
        else:
            cursor.executemany(sql, args)
        rows = [tuple(r) for r in cursor.fetchall()] if fetch else []
        return rows, cursor.rowcount if counted else -1
    except dbapi.Error as e:
        error = sa_exc.DBAPIError.instance(sql, list(args), e, dbapi.Error, dialect=conn.dialect)
        if cursor is not None:
            with contextlib.suppress(dbapi.Error):
                cursor.close()
        conn.invalidate(e)
        raise error from e
    finally:
        if cursor is not None and not conn.invalidated:
            cursor.close()


# A key with its alias and one principal's grant on it (kms/backends/storage/grant_tx.py).
KEY_ACCESS = Prepared(
    select(
        t.keys,
        t.aliases.c.alias,
        t.grants.c.operations,
        t.grants.c.justifications,
        t.grants.c.seal.label("grant_seal"),
    )
    .select_from(
        t.keys.outerjoin(t.aliases, t.aliases.c.key_id == t.keys.c.key_id).outerjoin(
            t.grants,
            (t.grants.c.key_id == t.keys.c.key_id)
            & (t.grants.c.principal_id == bindparam("principal_id")),
        )
    )
    .where(t.keys.c.key_id == bindparam("key_id"))
)
KEY_ACCESS_COLUMNS = (
    *t.keys.columns.keys(),
    "alias",
    "operations",
    "justifications",
    "grant_seal",
)
# The key's XKS policy (kms/backends/storage/xks_tx.py).
XKS_POLICY = Prepared(
    select(
        t.xks_key_policies.c.usage,
        t.xks_key_policies.c.aws_principals,
        t.xks_key_policies.c.kms_operations,
        t.xks_key_policies.c.seal,
    ).where(t.xks_key_policies.c.key_id == bindparam("key_id"))
)
# Record a SigV4 nonce unless a live one is recorded (an expired one is replaced): one
# row changed means accepted (kms/backends/storage/sigv4_tx.py). SQLite and PostgreSQL.
NONCE_REMEMBER = Prepared(
    text(
        "INSERT INTO sigv4_nonces (nonce, expires_at) VALUES (:nonce, :expires_at) "
        "ON CONFLICT (nonce) DO UPDATE SET expires_at = excluded.expires_at "
        "WHERE sigv4_nonces.expires_at < :now"
    )
)
AUDIT_HEAD = Prepared(
    select(
        t.audit_head.c.seq,
        t.audit_head.c.hash,
        t.audit_head.c.checkpoint_seq,
        t.audit_head.c.archived_seq,
    )
    .where(t.audit_head.c.id == literal_column("1"))
    .with_for_update()
)
AUDIT_HEAD_MOVE = Prepared(
    update(t.audit_head)
    .where(t.audit_head.c.id == literal_column("1"))
    .values(seq=bindparam("seq"), hash=bindparam("hash"))
)
AUDIT_INSERT = Prepared(
    insert(t.audit_records).values({c.name: bindparam(c.name) for c in t.audit_records.c})
)

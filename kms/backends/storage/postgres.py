"""PostgreSQL specifics of the Storage port: engine options, the writer lock, erasure.

Writers are serialised as on SQLite: every write transaction first takes one
transaction-scoped advisory lock, so a write transaction sees every write committed
before it started and none interleaves with it. The services were written for that
model (re-read under the write lock, then write); PostgreSQL's default READ COMMITTED
alone would let two nodes' updates of one key interleave and lose one of them. Audit
appends are serialised by that lock and by the chain head row lock, so the chain stays
one linear sequence across processes and nodes. Reads never take the lock.

Every connection runs in UTC with bounded waits, so a congested or stopped server gives
503 within seconds, well inside gunicorn's 30 s worker timeout:

- ``connect_timeout`` 5 s (an unreachable server), ``lock_timeout`` 5 s (the writer
  lock, like SQLite's busy timeout), ``statement_timeout`` 15 s,
  ``idle_in_transaction_session_timeout`` 60 s (a stuck client cannot hold the lock),
  ``tcp_user_timeout`` 10 s and TCP keepalives (a server host that vanished);
- a small pool per process (gunicorn sync workers run one request at a time; the extra
  connections serve the background loops), checked out within 5 s, pinged before use so
  that connections broken by a server restart are replaced without restarting the KMS.

Durability is the server's ``synchronous_commit``; the KMS logs a warning if it is
``off`` (a crash could then lose the newest committed audit records).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine

log = logging.getLogger("kms.storage")

# pg_advisory_xact_lock key of the writer lock ("kms-writ" as a big-endian int64).
WRITER_LOCK_KEY = int.from_bytes(b"kms-writ", "big")
CONNECT_TIMEOUT_S = 5
LOCK_TIMEOUT_MS = 5_000
STATEMENT_TIMEOUT_MS = 15_000
IDLE_IN_TRANSACTION_MS = 60_000
TCP_USER_TIMEOUT_MS = 10_000
POOL_SIZE = 2
MAX_OVERFLOW = 4
POOL_TIMEOUT_S = 5
POOL_RECYCLE_S = 1800

# Tables whose deleted rows held key material (crypto-shredding, kms/services/keys.py).
_ERASED_TABLES = ("key_versions",)


def postgres_engine(url: URL) -> Engine:
    """An engine for ``postgresql+psycopg://`` URLs with the settings described above."""
    engine = create_engine(
        url.set(drivername="postgresql+psycopg"),
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_S,
        pool_recycle=POOL_RECYCLE_S,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": "kms",
            # A server that vanished without closing its connections (host down, network
            # cut): unacknowledged data fails the connection after TCP_USER_TIMEOUT_MS,
            # an idle one is probed by keepalives, instead of the kernel's ~15 minutes.
            "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        },
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")
            cur.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            cur.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            cur.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
        dbapi_conn.commit()

    @event.listens_for(engine, "first_connect")
    def _on_first_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SHOW synchronous_commit")
            row = cur.fetchone()
        dbapi_conn.rollback()
        if row is not None and row[0] == "off":
            log.warning(
                "PostgreSQL synchronous_commit is off: a server crash can lose the newest "
                "committed audit records"
            )

    return engine


def lock_writers(conn: Connection) -> None:
    """Take the writer lock for the rest of ``conn``'s transaction (waits at most
    LOCK_TIMEOUT_MS, then raises OperationalError)."""
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITER_LOCK_KEY})")


def vacuum_erased(engine: Engine) -> None:
    """VACUUM the tables erased rows were deleted from, so their dead tuples are removed
    and their space is reusable at once instead of at the next autovacuum. It does not
    zero the freed bytes: they stay in the table's free space until overwritten, and in
    WAL segments, archives, replicas and backups (see SECURITY.md). Logs, never raises."""
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in _ERASED_TABLES:
                conn.exec_driver_sql(f"VACUUM {table}")
    except sa_exc.SQLAlchemyError:
        log.exception("VACUUM after erasure failed; autovacuum will remove the rows later")

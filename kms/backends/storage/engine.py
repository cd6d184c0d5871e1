"""The engine behind SqlStorage: SQLite's pragmas and transaction behaviour here,
PostgreSQL's in kms/backends/storage/postgres.py.

SQLite runs in WAL mode; write transactions start with ``BEGIN IMMEDIATE`` so that
writers queue on the database lock instead of failing on lock upgrade.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, make_url

from kms.backends.storage import prepared
from kms.backends.storage.postgres import postgres_engine
from kms.config import ConfigError

WAL_BACKSTOP_PAGES = 16384


def make_engine(url: str, sqlite_synchronous: str = "FULL") -> Engine:
    """An engine with the pragmas and transaction behaviour SqlStorage relies on, for a
    ``sqlite:///`` or ``postgresql+psycopg://`` URL; ConfigError for anything else."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as e:
        raise ConfigError("KMS_DATABASE_URL is not a valid database URL") from e
    if parsed.drivername in ("postgresql+psycopg", "postgresql"):  # psycopg 3 either way
        return postgres_engine(parsed)
    if parsed.get_backend_name() != "sqlite":
        raise ConfigError(
            "KMS_DATABASE_URL must start with sqlite:/// or postgresql+psycopg://, "
            f"not {parsed.drivername}://"
        )
    # Wait at most 5 s for the write lock: well inside gunicorn's 30 s worker timeout, so a
    # congested database answers 503 instead of a killed worker.
    engine = create_engine(url, connect_args={"timeout": 5})
    on_disk = parsed.database not in (None, "", ":memory:")
    files = [f"{parsed.database}{suffix}" for suffix in ("", "-wal", "-shm")] if on_disk else []

    @event.listens_for(engine, "do_connect")
    def _note_read_only(_dialect: Any, record: Any, _cargs: Any, _cparams: Any) -> None:
        # SQLite opens a file it cannot write read-only, silently, for the connection's
        # whole life (a filesystem gone read-only, an immutable file). Remember that here,
        # before the open, so the connection can be replaced once the files are writable.
        record.info["opened_read_only"] = not _writable(files)

    @event.listens_for(engine, "checkout")
    def _replace_if_writable_again(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if record.info.get("opened_read_only") and _writable(files):
            raise sa_exc.DisconnectionError("reopening: the database is writable again")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA secure_delete=ON")  # erased key material is zeroed on disk
        cur.execute("PRAGMA busy_timeout=5000")
        # The write-ahead log is copied into the database by SqlStorage.checkpoint_wal in
        # each worker's background loop, not by the committing request: a checkpoint syncs
        # both files, and a slow sync under the writer lock stalls every request queued
        # behind it. A request checkpoints only if that loop has fallen this far behind
        # (pages of 4 KiB: 64 MiB of log).
        cur.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # On the DBAPI cursor: every request's transaction starts here, and SQLAlchemy's
        # executor would cost several times the statement itself (kms.backends.storage.prepared).
        immediate = conn.get_execution_options().get("kms_write", False)
        prepared.run_on_cursor(conn, "BEGIN IMMEDIATE" if immediate else "BEGIN")

    @event.listens_for(engine, "handle_error")
    def _drop_read_only(ctx: Any) -> None:
        # Backstop for a file that became write-protected between the check above and the
        # open: a write refused as read-only drops the connection from the pool.
        error = ctx.original_exception
        if isinstance(error, sqlite3.OperationalError) and (
            getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_READONLY
        ):
            ctx.is_disconnect = True

    return engine


def _writable(paths: list[str]) -> bool:
    """True unless one of the SQLite files that exist refuses writing (checked with
    access(2), which reports immutable files and read-only mounts, for root too)."""
    return all(os.access(p, os.W_OK) for p in paths if os.path.exists(p))

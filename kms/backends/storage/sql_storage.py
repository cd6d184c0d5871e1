"""The Storage port over SQLAlchemy Core: transactions, and the upkeep of the database
files.

Writers are serialised on both databases: SQLite write transactions start with ``BEGIN
IMMEDIATE`` (kms/backends/storage/engine.py) after a file lock that queues them;
PostgreSQL write transactions first take an advisory lock
(kms/backends/storage/postgres.py). The audit head row is read ``FOR UPDATE`` (a row lock
on PostgreSQL). Every database error that is not a constraint violation is translated to
StorageUnavailable (503): the caller is refused, nothing half-done stays behind because
the transaction rolls back.

A transaction's rows are read and written by SqlTx, one mixin per table family (the
*_tx.py modules), as the Tx port is split into *Rows protocols in kms/services/ports.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from kms.backends.storage.alias_tx import AliasTx
from kms.backends.storage.audit_tx import AuditTx
from kms.backends.storage.change_tx import ChangeTx
from kms.backends.storage.engine import WAL_BACKSTOP_PAGES, make_engine
from kms.backends.storage.escrow_tx import EscrowTx
from kms.backends.storage.file_lock import FileLock
from kms.backends.storage.grant_tx import GrantTx
from kms.backends.storage.key_tx import KeyTx
from kms.backends.storage.lifecycle_tx import LifecycleTx
from kms.backends.storage.migrate import SchemaNotCurrent, check_current
from kms.backends.storage.postgres import lock_writers, vacuum_erased
from kms.backends.storage.principal_tx import PrincipalTx
from kms.backends.storage.seal_tx import SealTx
from kms.backends.storage.sigv4_tx import SigV4Tx
from kms.backends.storage.state_tx import StateTx
from kms.backends.storage.xks_tx import XksTx
from kms.errors import StorageUnavailable
from kms.services.ports import Seals, TxSeals

# make_engine and WAL_BACKSTOP_PAGES are defined in engine.py; re-exported for callers
__all__ = ["WAL_BACKSTOP_PAGES", "WAL_FINISH_FRAMES", "SqlStorage", "SqlTx", "make_engine"]

log = logging.getLogger("kms.storage")

WAL_FINISH_FRAMES = 4096  # 16 MiB: the log a background checkpoint finishes under the lock


class SqlTx(
    ChangeTx,
    PrincipalTx,
    KeyTx,
    AliasTx,
    GrantTx,
    LifecycleTx,
    AuditTx,
    EscrowTx,
    SigV4Tx,
    XksTx,
    SealTx,
    StateTx,
):
    """The Tx port on one SQLAlchemy connection inside a transaction; every row that
    grants or describes access is sealed on write and checked on read with ``seals``."""

    def __init__(self, conn: Connection, seals: TxSeals) -> None:
        self._c = conn
        self._seals = seals

    def check_current(self, kind: str, ident: str, seal: str) -> None:
        self._seals.current(kind, ident, seal)

    def check_absent(self, kind: str, ident: str) -> None:
        self._seals.absent(kind, ident)

    def check_complete(self, kind: str, found: set[str]) -> None:
        self._seals.complete(kind, found)


class _Unsealed:
    """The seals of a storage nobody gave any: every sealed row is refused."""

    def _refuse(self, *_: Any) -> NoReturn:
        raise RuntimeError("storage used without row seals (SqlStorage.seal_with)")

    seal = check = wrote = current = absent = complete = _refuse

    def __init__(self) -> None:
        self.written: dict[tuple[str, str], str | None] = {}

    def follow(self, storage: Any) -> None:
        pass

    def begin(self) -> _Unsealed:
        return self

    def commit(self, tx: Any, seals: Any) -> None:
        return None


class SqlStorage:
    """The Storage port. One engine (connection pool) per process, made at start.

    On SQLite, writers queue on an exclusive ``flock`` of ``<database>.lock`` before
    ``BEGIN IMMEDIATE``: the kernel wakes the next writer as soon as the lock is free,
    where SQLite's own busy handler sleeps up to 100 ms between tries."""

    def __init__(self, engine: Engine, seals: Seals | None = None) -> None:
        self._engine = engine
        self._seals: Seals = _Unsealed()
        if seals is not None:
            self.seal_with(seals)
        self._postgres = engine.url.get_backend_name() == "postgresql"
        path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        on_disk = bool(path) and path != ":memory:"
        self._lock_path = f"{path}.lock" if on_disk else None
        self._writer = FileLock(self._lock_path)
        # held by whoever checkpoints the WAL (checkpoint_wal, purge_erased): SQLite runs
        # one checkpoint at a time and answers a second one "busy" without waiting
        self._checkpointer = FileLock(f"{path}.ckpt" if on_disk else None)
        self._wal_checkpoints_ok = True

    def seal_with(self, seals: Seals) -> None:
        """Seal and check rows with ``seals`` from now on (the service layer's RowSeals,
        set when the services are built over this storage), fresh against the HSM state
        anchor of this storage's rows."""
        self._seals = seals
        seals.follow(self)

    @contextmanager
    def transaction(self) -> Iterator[SqlTx]:
        with self._translate(), self._writer_lock(), self._engine.connect() as conn:
            conn = conn.execution_options(kms_write=True)
            seals = self._seals.begin()
            finish = None
            try:
                with conn.begin():
                    if self._postgres:
                        lock_writers(conn)
                    tx = SqlTx(conn, seals)
                    yield tx
                    # the sealed rows it wrote move the HSM state anchor before it commits
                    finish = self._seals.commit(tx, seals)
            except BaseException:
                if finish is not None:
                    finish(False)
                raise
            if finish is not None:
                finish(True)

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        # Blocking: the kernel hands the lock over at once. A writer stuck while holding
        # it is ended by gunicorn's worker timeout, and its lock dies with the process.
        with self._writer.held():
            yield

    @contextmanager
    def reader(self) -> Iterator[SqlTx]:
        with self._translate(), self._engine.connect() as conn, conn.begin():
            yield SqlTx(conn, self._seals.begin())

    def purge_erased(self) -> None:
        """On SQLite, checkpoint the WAL into the database and truncate it: deleted rows
        were zeroed in their pages (``secure_delete``), but older page images stay in the
        WAL until it is truncated. It waits for a background checkpoint to finish
        (checkpoint_wal), then holds the writer lock. Readers holding old snapshots can
        still make the truncation incomplete (logged); it then happens at the next call.
        On PostgreSQL, VACUUM the erased rows' table (postgres.vacuum_erased says what
        that does and does not remove)."""
        if self._postgres:
            vacuum_erased(self._engine)
            return
        try:
            with self._checkpointer.held(), self._writer_lock(), self._engine.connect() as conn:
                busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
            if busy is not None and busy[0]:
                log.warning("WAL truncation incomplete; erased material may linger in the WAL")
        except (sa_exc.SQLAlchemyError, OSError):
            log.exception("WAL truncation failed")

    def checkpoint_wal(self, finish_at: int = WAL_FINISH_FRAMES) -> None:
        """On SQLite, copy the write-ahead log into the database file. Nothing on
        PostgreSQL, or while another process or thread is checkpointing (one at a time).

        The first pass copies what the log holds and syncs, without the writer lock:
        requests go on committing meanwhile. If they committed during it and the log has
        reached ``finish_at`` frames, a second pass under the writer lock copies just
        that, so that the log is complete and the next writer starts it over (a log
        written to without pause never restarts otherwise, and would grow to the
        backstop of make_engine). Both passes are PASSIVE: they never wait for readers,
        and copy nothing a reader's snapshot still needs.

        Best effort, never raises: a failure is logged once (per process) until a
        checkpoint succeeds again."""
        if self._postgres or self._lock_path is None:
            return
        try:
            with self._checkpointer.held(wait=False) as mine:
                if not mine:
                    return
                with self._engine.connect() as conn:
                    row = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").first()
                _busy, frames, copied = row if row is not None else (0, 0, 0)
                if copied < frames and frames >= finish_at:
                    with self._writer_lock(), self._engine.connect() as conn:
                        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except (sa_exc.SQLAlchemyError, OSError) as e:
            if self._wal_checkpoints_ok:
                reason = getattr(getattr(e, "orig", None), "sqlite_errorname", None)
                log.warning("WAL checkpoint failed", extra={"error": reason or type(e).__name__})
            self._wal_checkpoints_ok = False
        else:
            self._wal_checkpoints_ok = True

    def check(self) -> None:
        with self._translate():
            try:
                check_current(self._engine)
            except SchemaNotCurrent as e:
                raise StorageUnavailable(detail=str(e)) from e

    @staticmethod
    @contextmanager
    def _translate() -> Iterator[None]:
        try:
            yield
        except sa_exc.IntegrityError as e:
            raise StorageUnavailable(detail=f"integrity: {type(e.orig).__name__}") from e
        except sa_exc.SQLAlchemyError as e:
            raise StorageUnavailable(detail=f"database: {type(e).__name__}") from e
        except OSError as e:  # the writer lock file
            raise StorageUnavailable(detail=f"lock file: {type(e).__name__}") from e

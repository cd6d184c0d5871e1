"""The Storage port over SQLAlchemy Core.

Writers are serialised on both databases: SQLite runs in WAL mode and write transactions
start with ``BEGIN IMMEDIATE`` so that writers queue on the database lock instead of
failing on lock upgrade; PostgreSQL write transactions first take an advisory lock
(kms/backends/storage/postgres.py). The audit head row is read ``FOR UPDATE`` (a row lock
on PostgreSQL). Every database error that is not a constraint violation is translated to
StorageUnavailable (503): the caller is refused, nothing half-done stays behind because
the transaction rolls back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine, Row, make_url

from kms.backends.storage import prepared
from kms.backends.storage import schema as t
from kms.backends.storage.alias_tx import AliasTx
from kms.backends.storage.escrow_tx import EscrowTx
from kms.backends.storage.lifecycle_tx import LifecycleTx
from kms.backends.storage.migrate import SchemaNotCurrent, check_current
from kms.backends.storage.postgres import lock_writers, postgres_engine, vacuum_erased
from kms.backends.storage.sigv4_tx import SigV4Tx
from kms.backends.storage.xks_tx import XksTx
from kms.config import ConfigError
from kms.errors import Conflict, StorageUnavailable
from kms.services.model import (
    AuditHead,
    AuditQuery,
    EscrowPolicy,
    Grant,
    Key,
    KeyAccess,
    KeyState,
    KeyVersion,
    Principal,
    Role,
)

log = logging.getLogger("kms.storage")


WAL_BACKSTOP_PAGES = 16384
WAL_FINISH_FRAMES = 4096  # 16 MiB: the log a background checkpoint finishes under the lock


def make_engine(url: str, sqlite_synchronous: str = "FULL") -> Engine:
    """An engine with the pragmas and transaction behaviour this module relies on, for a
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
        # behind it (p99 of a decrypt at half load: 10 to 330 ms with it, 5 to 7 without,
        # on the development VM). A request checkpoints only if that loop has fallen this
        # far behind (pages of 4 KiB: 64 MiB of log).
        cur.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # On the DBAPI cursor: every request's transaction starts here, and SQLAlchemy's
        # executor would add about 15 µs to the statement's 2 (kms.backends.storage.prepared).
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


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class SqlTx(AliasTx, EscrowTx, LifecycleTx, SigV4Tx, XksTx):
    """The Tx port on one SQLAlchemy connection inside a transaction (escrow tables in
    EscrowTx, usage and destruction in LifecycleTx, SigV4 credentials in SigV4Tx, XKS key
    policies in XksTx)."""

    def __init__(self, conn: Connection) -> None:
        self._c = conn

    # -- principals -----------------------------------------------------------------------

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

    # -- keys -----------------------------------------------------------------------------

    def add_key(self, key: Key) -> None:
        self._c.execute(
            insert(t.keys).values(
                key_id=key.key_id,
                description=key.description,
                state=key.state.value,
                current_version=key.current_version,
                created_at=key.created_at,
                deletion_date=key.deletion_date,
                escrow_policy=_policy_json(key.escrow_policy),
                rotation_period_days=key.rotation_period_days,
                min_decryption_version=key.min_decryption_version,
                rotated_at=key.rotated_at,
            )
        )
        if key.alias is not None:
            try:
                self._c.execute(insert(t.aliases).values(alias=key.alias, key_id=key.key_id))
            except sa_exc.IntegrityError as e:
                raise Conflict(f"alias {key.alias!r} is already in use") from e

    def add_version(self, version: KeyVersion) -> None:
        self._c.execute(
            insert(t.key_versions).values(
                key_id=version.key_id,
                version=version.version,
                wrapped_kek=version.wrapped,
                root_label=version.root_label,
                created_at=version.created_at,
            )
        )

    def update_key(self, key: Key) -> None:
        self._c.execute(
            update(t.keys)
            .where(t.keys.c.key_id == key.key_id)
            .values(
                state=key.state.value,
                current_version=key.current_version,
                deletion_date=key.deletion_date,
                description=key.description,
                escrow_policy=_policy_json(key.escrow_policy),
                rotation_period_days=key.rotation_period_days,
                min_decryption_version=key.min_decryption_version,
                rotated_at=key.rotated_at,
            )
        )

    def key_by_id(self, key_id: str) -> Key | None:
        row = self._c.execute(_KEY_BY_ID, {"key_id": key_id}).first()
        return _key(row) if row else None

    def key_by_alias(self, alias: str) -> Key | None:
        return self._one_key(t.aliases.c.alias == alias)

    def list_keys(self) -> list[Key]:
        return [_key(r) for r in self._c.execute(_key_select().order_by(t.keys.c.created_at))]

    def keys_in_states(self, states: Sequence[KeyState]) -> list[Key]:
        stmt = _key_select().where(t.keys.c.state.in_([s.value for s in states]))
        return [_key(r) for r in self._c.execute(stmt.order_by(t.keys.c.created_at))]

    def key_version(self, key_id: str, version: int) -> KeyVersion | None:
        row = self._c.execute(_KEY_VERSION, {"key_id": key_id, "version": version}).first()
        if row is None:
            return None
        return KeyVersion(
            key_id=row.key_id,
            version=row.version,
            created_at=_utc(row.created_at),  # type: ignore[arg-type]
            wrapped=bytes(row.wrapped_kek),
            root_label=row.root_label,
        )

    def _one_key(self, where: Any) -> Key | None:
        row = self._c.execute(_key_select().where(where)).first()
        return _key(row) if row else None

    # -- grants ---------------------------------------------------------------------------

    def put_grant(self, key_id: str, principal_id: int, grant: Grant) -> None:
        values = {
            "operations": ",".join(sorted(grant.operations)),
            "justifications": ",".join(sorted(grant.justifications)),
        }
        where = (t.grants.c.key_id == key_id, t.grants.c.principal_id == principal_id)
        if self._c.execute(select(t.grants.c.key_id).where(*where)).first():
            self._c.execute(update(t.grants).where(*where).values(**values))
        else:
            self._c.execute(
                insert(t.grants).values(key_id=key_id, principal_id=principal_id, **values)
            )

    def key_access(self, key_id: str, principal_id: int) -> KeyAccess | None:
        rows = prepared.KEY_ACCESS.rows(self._c, {"key_id": key_id, "principal_id": principal_id})
        if not rows:
            return None
        state, min_version, operations, justifications = rows[0]
        grant = Grant(_split(operations), _split(justifications)) if operations else Grant()
        return KeyAccess(KeyState(state), grant, int(min_version))

    def grant(self, key_id: str, principal_id: int) -> Grant:
        row = self._c.execute(_GRANT, {"key_id": key_id, "principal_id": principal_id}).first()
        if row is None:
            return Grant()
        return Grant(_split(row.operations), _split(row.justifications))

    # -- audit ----------------------------------------------------------------------------

    def audit_head(self) -> AuditHead:
        (seq, hash_, checkpoint_seq, archived_seq), *_ = prepared.AUDIT_HEAD.rows(self._c, {})
        return AuditHead(int(seq), str(hash_), int(checkpoint_seq), int(archived_seq))

    def insert_audit(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        prepared.AUDIT_INSERT.execute(self._c, records)
        last = records[-1]
        prepared.AUDIT_HEAD_MOVE.execute(self._c, [{"seq": last["seq"], "hash": last["hash"]}])

    def audit_records(
        self, after: int, limit: int, until: int | None = None, query: AuditQuery | None = None
    ) -> list[dict[str, Any]]:
        r = t.audit_records.c
        stmt = select(t.audit_records).where(r.seq > after)
        if until is not None:
            stmt = stmt.where(r.seq <= until)
        if query is not None:
            for column, value in (
                (r.key_id, query.key_id),
                (r.principal, query.principal),
                (r.operation, query.operation),
                (r.outcome, query.outcome),
                (r.case_id, query.case_id),
            ):
                if value is not None:
                    stmt = stmt.where(column == value)
            if query.since is not None:
                stmt = stmt.where(r.time >= query.since)
            if query.until is not None:
                stmt = stmt.where(r.time < query.until)
        rows = self._c.execute(stmt.order_by(r.seq).limit(limit))
        return [row._asdict() for row in rows]

    def audit_counts(self, since: str, until: str) -> list[dict[str, Any]]:
        r = t.audit_records.c
        escrow = r.case_id.is_not(None).label("escrow")
        cols = (r.key_id, r.principal, r.operation, r.outcome, r.justification, escrow)
        rows = self._c.execute(
            select(*cols, func.count().label("count"))
            .where(r.time >= since, r.time < until)
            .group_by(*cols)
        )
        return [row._asdict() for row in rows]

    def insert_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._c.execute(
            insert(t.audit_checkpoints).values(
                {k: v for k, v in checkpoint.items() if k not in ("v", "type")}
            )
        )
        self._c.execute(
            update(t.audit_head)
            .where(t.audit_head.c.id == 1)
            .values(checkpoint_seq=checkpoint["seq"])
        )

    def checkpoints(self, after: int, until: int | None, limit: int) -> list[dict[str, Any]]:
        c = t.audit_checkpoints.c
        stmt = select(t.audit_checkpoints).where(c.seq > after)
        if until is not None:
            stmt = stmt.where(c.seq <= until)
        rows = self._c.execute(stmt.order_by(c.seq).limit(limit))
        return [{"v": 1, **row._asdict()} for row in rows]

    def archive_audit_through(self, seq: int) -> int:
        deleted = self._c.execute(
            delete(t.audit_records).where(t.audit_records.c.seq <= seq)
        ).rowcount
        self._c.execute(update(t.audit_head).where(t.audit_head.c.id == 1).values(archived_seq=seq))
        return int(deleted)


def _split(text: str | None) -> frozenset[str]:
    return frozenset(x for x in (text or "").split(",") if x)


def _policy_json(policy: EscrowPolicy | None) -> str | None:
    if policy is None:
        return None
    return json.dumps(
        {
            "quorum": policy.quorum,
            "required_groups": sorted(policy.required_groups),
            "veto_groups": sorted(policy.veto_groups),
        }
    )


def _policy(text: str | None) -> EscrowPolicy | None:
    if text is None:
        return None
    data = json.loads(text)
    return EscrowPolicy(
        data["quorum"], frozenset(data["required_groups"]), frozenset(data["veto_groups"])
    )


def _key_select() -> Any:
    return select(t.keys, t.aliases.c.alias).outerjoin(
        t.aliases, t.aliases.c.key_id == t.keys.c.key_id
    )


# Statements of the crypto hot path, built once (building a statement per call costs more
# than running it on SQLite).
_KEY_BY_ID = _key_select().where(t.keys.c.key_id == bindparam("key_id"))
_KEY_VERSION = select(t.key_versions).where(
    t.key_versions.c.key_id == bindparam("key_id"),
    t.key_versions.c.version == bindparam("version"),
)
_GRANT = select(t.grants.c.operations, t.grants.c.justifications).where(
    t.grants.c.key_id == bindparam("key_id"),
    t.grants.c.principal_id == bindparam("principal_id"),
)


def _key(row: Row[Any]) -> Key:
    return Key(
        key_id=row.key_id,
        alias=row.alias,
        description=row.description,
        state=KeyState(row.state),
        current_version=row.current_version,
        created_at=_utc(row.created_at),  # type: ignore[arg-type]
        deletion_date=_utc(row.deletion_date),
        escrow_policy=_policy(row.escrow_policy),
        rotation_period_days=row.rotation_period_days,
        min_decryption_version=row.min_decryption_version,
        rotated_at=_utc(row.rotated_at),
    )


def _principal(row: Row[Any]) -> Principal:
    return Principal(int(row.id), row.name, Role(row.role), _utc(row.created_at))  # type: ignore[arg-type]


class _FileLock:
    """An exclusive ``flock`` of one file (opened again after a fork), held by one thread
    of the process at a time. No file (``None``): always granted, nothing locked."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._fd: int | None = None
        self._pid = 0
        self._thread_lock = threading.Lock()

    @contextmanager
    def held(self, wait: bool = True) -> Iterator[bool]:
        """Yield True while holding the lock; without ``wait``, yield False at once if
        another thread or process holds it."""
        if self._path is None:
            yield True
            return
        if not self._thread_lock.acquire(blocking=wait):
            yield False
            return
        try:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                self._pid = os.getpid()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                got = False
            else:
                got = True
            try:
                yield got
            finally:
                if got:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class SqlStorage:
    """The Storage port. One engine (connection pool) per process, made at start.

    On SQLite, writers queue on an exclusive ``flock`` of ``<database>.lock`` before
    ``BEGIN IMMEDIATE``: the kernel wakes the next writer as soon as the lock is free,
    where SQLite's own busy handler sleeps up to 100 ms between tries (measured with
    the benchmark: p99 of a decrypt under load fell from about 300 ms to about
    25 ms, and throughput rose by a quarter)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._postgres = engine.url.get_backend_name() == "postgresql"
        path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        on_disk = bool(path) and path != ":memory:"
        self._lock_path = f"{path}.lock" if on_disk else None
        self._writer = _FileLock(self._lock_path)
        # held by whoever checkpoints the WAL (checkpoint_wal, purge_erased): SQLite runs
        # one checkpoint at a time and answers a second one "busy" without waiting
        self._checkpointer = _FileLock(f"{path}.ckpt" if on_disk else None)
        self._wal_checkpoints_ok = True

    @contextmanager
    def transaction(self) -> Iterator[SqlTx]:
        with self._translate(), self._writer_lock(), self._engine.connect() as conn:
            conn = conn.execution_options(kms_write=True)
            with conn.begin():
                if self._postgres:
                    lock_writers(conn)
                yield SqlTx(conn)

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        # Blocking: the kernel hands the lock over at once. A writer stuck while holding
        # it is ended by gunicorn's worker timeout, and its lock dies with the process.
        with self._writer.held():
            yield

    @contextmanager
    def reader(self) -> Iterator[SqlTx]:
        with self._translate(), self._engine.connect() as conn, conn.begin():
            yield SqlTx(conn)

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

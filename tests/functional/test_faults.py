"""Fail closed: a database that refuses the audit append, an HSM that errors."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine
from kms.backends.storage.engine import WAL_BACKSTOP_PAGES
from kms.errors import StorageUnavailable
from tests.helpers import Api, FailingPkcs11, immutable


def _refuse_audit(db_path: Path) -> None:
    """A real database refusal: SQLite aborts every insert into the audit table."""
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_records "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )


def _accept_audit(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute("DROP TRIGGER refuse")


def test_no_operation_without_its_audit_record(api: Api, db_path: Path) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    keys_before = api.call("GET", "/v1/keys", api.admin).json
    records_before = len(api.audit())
    _refuse_audit(db_path)
    refused = [
        api.call("POST", "/v1/keys/k/datakey", svc, json={}),
        api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}),
        api.call("POST", "/v1/decrypt", svc, json={"items": [{"ciphertext": blob}] * 3}),
        api.call("POST", "/v1/keys", api.admin, json={"alias": "new"}),
        api.call("POST", "/v1/keys/k/rotate", api.admin),
        api.call("POST", "/v1/keys/k/disable", api.admin),
        api.call("POST", "/v1/principals", api.admin, json={"name": "p", "role": "auditor"}),
    ]
    for r in refused:
        assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable"
        assert "plaintext" not in r.json and "ciphertext" not in r.json and "token" not in r.json
    _accept_audit(db_path)
    assert api.call("GET", "/v1/keys", api.admin).json == keys_before  # nothing changed
    assert len(api.audit()) == records_before
    assert api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}).status_code == 200


def test_transient_hsm_error_is_retried_after_reconnect(api: Api, hsm: Pkcs11Hsm) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    hsm.check()
    conn = hsm._conn  # inject at the backend boundary: the cached session breaks once
    assert conn is not None
    conn.session = FailingPkcs11(conn.session)
    conn.root = FailingPkcs11(conn.root)
    conn.keks.clear()
    r = api.call("POST", "/v1/keys/k/datakey", svc, json={})
    assert r.status_code == 200  # reconnected and retried
    assert hsm._conn is not conn


def test_hsm_down_gives_503_and_recovers_without_restart(
    api: Api, hsm: Pkcs11Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    good = hsm._config
    # The token stops answering: the module now looks for a token that is not there.
    monkeypatch.setattr(hsm, "_config", type(good)(**{**good.__dict__, "token_label": "gone"}))
    hsm._conn = None
    for r in (
        api.call("POST", "/v1/keys/k/datakey", svc, json={}),
        api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}),
        api.call("POST", "/v1/keys", api.admin, json={}),
        api.call("POST", "/v1/keys/k/rotate", api.admin),
    ):
        assert r.status_code == 503 and r.json["error"]["code"] == "hsm_unavailable"
    ready = api.call("GET", "/readyz")
    assert ready.status_code == 503 and ready.json["checks"]["hsm"] == "hsm_unavailable"
    monkeypatch.setattr(hsm, "_config", good)  # the HSM is back: within the back-off
    deadline = time.monotonic() + 10  # after a failed connect (about a second), ready
    while (ready := api.call("GET", "/readyz")).status_code != 200:
        assert time.monotonic() < deadline, ready.json
        time.sleep(0.1)
    # each refusal is in the audit trail (read now: a caller remembered from before the
    # outage passes authentication for KMS_AUTH_CACHE_SECONDS only; after that, a caller
    # needs the HSM's state anchor to authenticate, kms/services/principals.py)
    records = api.audit()
    refused = [x for x in records if x["outcome"] == "hsm_unavailable"]
    assert len(refused) >= 1
    assert {x["operation"] for x in refused} <= {"datakey", "decrypt", "create_key", "rotate_key"}
    assert api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}).status_code == 200
    assert api.call("GET", "/v1/keys/k", api.admin).json["current_version"] == 1  # no half rotation


def test_database_down_gives_503_and_recovers(api: Api, db_path: Path, storage: SqlStorage) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    moved = db_path.with_suffix(".moved")
    storage._engine.dispose()  # drop pooled connections, as after a database restart
    db_path.rename(moved)
    db_path.mkdir()  # a directory where the database file was: every open fails
    r = api.call("POST", "/v1/keys/k/datakey", svc, json={})
    assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable"
    ready = api.call("GET", "/readyz")
    assert ready.status_code == 503 and ready.json["checks"]["database"] == "storage_unavailable"
    db_path.rmdir()
    moved.rename(db_path)
    assert api.call("POST", "/v1/keys/k/datakey", svc, json={}).status_code == 200


def test_refused_audit_appends_are_logged(api: Api, db_path: Path) -> None:
    """Refusals for want of an audit record are counted in the structured log."""
    import logging

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("kms.api")
    logger.addHandler(handler)
    try:
        svc = api.principal("service", "svc")
        api.key("k", grant=svc)
        _refuse_audit(db_path)
        assert api.call("POST", "/v1/keys/k/datakey", svc, json={}).status_code == 503
        _accept_audit(db_path)
    finally:
        logger.removeHandler(handler)
    assert [getattr(r, "code", None) for r in seen] == ["storage_unavailable"]


def test_a_connection_opened_while_read_only_is_replaced_once_writable(tmp_path: Path) -> None:
    """SQLite silently opens a file it cannot write read-only, for the connection's whole
    life. The engine replaces such a connection at checkout once the files are writable, so
    the first write after an outage already succeeds."""
    db = tmp_path / "ro.sqlite3"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    engine.dispose()  # the next connection is opened during the outage
    with immutable([db]), engine.connect() as c:  # reads work, and the connection is pooled
        assert c.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    with engine.begin() as c:  # writable again: the pooled read-only connection is replaced
        c.exec_driver_sql("INSERT INTO t VALUES (2)")
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT x FROM t").scalars().all() == [2]


def _storage_with_table(db: Path) -> SqlStorage:
    """A SqlStorage on a new SQLite file ``db`` holding an empty table t (x)."""
    storage = SqlStorage(make_engine(f"sqlite:///{db}", "NORMAL"))
    with storage.transaction() as tx:
        tx._c.exec_driver_sql("CREATE TABLE t (x)")
    return storage


def test_a_database_locked_by_another_program_is_refused_then_recovers(tmp_path: Path) -> None:
    """A write transaction that cannot start (another program holds SQLite's write lock
    past the 5 s busy timeout) is StorageUnavailable, which the API answers 503, and the
    next transaction after the lock is released succeeds."""
    db = tmp_path / "locked.sqlite3"
    storage = _storage_with_table(db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a maintenance script that never commits
    try:
        with pytest.raises(StorageUnavailable) as refused, storage.transaction():
            pytest.fail("the transaction began although the database was locked")
        assert refused.value.detail == "database: OperationalError"
    finally:
        other.execute("ROLLBACK")
        other.close()
    with storage.transaction() as tx:
        tx._c.exec_driver_sql("INSERT INTO t VALUES (1)")
    with storage.reader() as tx:
        assert tx._c.exec_driver_sql("SELECT x FROM t").scalars().all() == [1]


def _rows_in_database_file(db: Path, copy: Path) -> int | None:
    """Rows of t in the database file alone, without its write-ahead log (None if the
    file is not readable alone: copied in the middle of a checkpoint, or after one that
    could not copy everything)."""
    copy.write_bytes(db.read_bytes())
    try:
        with contextlib.closing(sqlite3.connect(copy)) as c:
            return int(c.execute("SELECT count(*) FROM t").fetchone()[0])
    except sqlite3.DatabaseError:
        return None


def _insert(storage: SqlStorage, values: range) -> None:
    for i in values:
        with storage.transaction() as tx:
            tx._c.exec_driver_sql("INSERT INTO t VALUES (?)", (f"{i:0>500}",))


def test_requests_leave_the_wal_checkpoint_to_the_background_loop(tmp_path: Path) -> None:
    """A commit does not checkpoint (that syncs both files under the writer lock: the tail
    latency of every request queued behind it). SqlStorage.checkpoint_wal, run twice a
    second by each worker, copies the log without the writer lock, then takes the lock
    only to finish what writers added meanwhile, so that the log starts over."""
    db = tmp_path / "wal.sqlite3"
    url = f"sqlite:///{db}"
    storage = _storage_with_table(db)
    storage.checkpoint_wal()
    _insert(storage, range(1500))  # over SQLite's default of a checkpoint per 1,000 pages
    assert _rows_in_database_file(db, tmp_path / "copy.sqlite3") == 0
    with storage.reader() as tx:  # requests checkpoint only past the 64 MiB backstop
        backstop = tx._c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
    assert backstop == WAL_BACKSTOP_PAGES == 16384

    # a reader's snapshot keeps the first pass from copying the 50 rows committed after
    # it, as commits during the pass would: so the second pass has something to finish
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 1500
    _insert(storage, range(1500, 1550))
    writer = SqlStorage(make_engine(url, "NORMAL"))  # another worker, mid-transaction
    before = db.stat().st_size
    with writer._writer_lock():
        checkpoint = threading.Thread(target=storage.checkpoint_wal, kwargs={"finish_at": 1})
        checkpoint.start()
        for _ in range(100):  # the first pass copies while the lock is held elsewhere
            if db.stat().st_size > before + 750_000:  # 1,500 rows of 500 bytes
                break
            time.sleep(0.05)
        assert db.stat().st_size > before + 750_000
        time.sleep(0.2)
        assert checkpoint.is_alive()  # the second pass waits for the writer lock
    checkpoint.join(timeout=10)
    assert not checkpoint.is_alive()
    reader.execute("COMMIT")
    reader.close()
    storage.checkpoint_wal(finish_at=1)
    assert _rows_in_database_file(db, tmp_path / "copy.sqlite3") == 1550

    wal = db.with_name(db.name + "-wal")
    size = wal.stat().st_size
    _insert(storage, range(20))
    assert wal.stat().st_size == size  # the log started over instead of growing


def test_one_checkpoint_at_a_time_and_the_purge_waits_for_it(tmp_path: Path) -> None:
    """SQLite answers a second concurrent checkpoint "busy" at once: the background loop
    skips its turn while another checkpoints, and the WAL truncation after a key's
    destruction waits instead of leaving erased material in the log."""
    db = tmp_path / "purge.sqlite3"
    url = f"sqlite:///{db}"
    storage = _storage_with_table(db)
    storage.checkpoint_wal()
    _insert(storage, range(200))
    wal = db.with_name(db.name + "-wal")
    other = SqlStorage(make_engine(url, "NORMAL"))  # another worker, checkpointing
    with other._checkpointer.held():
        storage.checkpoint_wal(finish_at=1)  # skipped: nothing copied
        assert _rows_in_database_file(db, tmp_path / "copy.sqlite3") == 0
        purge = threading.Thread(target=storage.purge_erased)
        purge.start()
        time.sleep(0.3)
        assert purge.is_alive() and wal.stat().st_size > 0
    purge.join(timeout=10)
    assert not purge.is_alive()
    assert wal.stat().st_size == 0  # truncated: no old page image left in the log
    assert _rows_in_database_file(db, tmp_path / "copy.sqlite3") == 200


def test_a_failing_wal_checkpoint_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "gone.sqlite3"
    storage = _storage_with_table(db)
    storage._engine.dispose()
    db.rename(tmp_path / "moved")
    db.mkdir()  # every open fails
    for _ in range(3):
        storage.checkpoint_wal()
    assert [r.getMessage() for r in caplog.records] == ["WAL checkpoint failed"]
    db.rmdir()
    (tmp_path / "moved").rename(db)
    storage.checkpoint_wal()
    db.rename(tmp_path / "moved")
    db.mkdir()
    storage._engine.dispose()
    storage.checkpoint_wal()  # failing again after a success: logged again
    assert [r.getMessage() for r in caplog.records] == ["WAL checkpoint failed"] * 2

"""What only PostgreSQL does: the writer lock across engines, bounded lock waits, the
session settings every connection gets, erasure by VACUUM, and the URL forms."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import pytest

from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SchemaNotCurrent, SqlStorage, make_engine, postgres
from kms.backends.storage.migrate import check_current_if_reachable
from kms.errors import StorageUnavailable
from kms.services.model import Key, KeyState, KeyVersion
from kms.services.seals import RowSeals
from tests.helpers import anchored, free_port
from tests.pg import PgCluster, PgDatabase, fresh_name

NOW = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def _key(state: KeyState = KeyState.ENABLED) -> Key:
    return Key("k1", None, "", state, 1, NOW)


def test_write_transactions_of_two_engines_take_turns(
    pg_database: PgDatabase, pg_storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A writer that read a key while another writer was changing it would overwrite the
    change (READ COMMITTED alone allows that): the second writer must wait and see it."""
    with pg_storage.transaction() as tx:
        tx.add_key(_key())
    other = SqlStorage(make_engine(pg_database.url), RowSeals(hsm))
    first_in, first_may_commit = threading.Event(), threading.Event()
    seen_by_second: list[KeyState] = []

    def first() -> None:
        with pg_storage.transaction() as tx:
            key = tx.key_by_id("k1")
            assert key is not None
            first_in.set()
            first_may_commit.wait(10)
            tx.update_key(Key(**{**key.__dict__, "state": KeyState.DISABLED}))

    def second() -> None:
        first_in.wait(10)
        with other.transaction() as tx:  # waits for the first writer's commit
            key = tx.key_by_id("k1")
            assert key is not None
            seen_by_second.append(key.state)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(10)
    blocked = _wait_for_a_blocked_writer(pg_database)
    first_may_commit.set()
    for t in threads:
        t.join()
    other._engine.dispose()
    assert blocked and seen_by_second == [KeyState.DISABLED]


def _wait_for_a_blocked_writer(db: PgDatabase) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        waiting = db.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        if waiting == [(1,)]:
            return True
        time.sleep(0.02)
    return False


def test_a_writer_waiting_too_long_for_the_lock_gets_503(
    pg_database: PgDatabase, pg_storage: SqlStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT_MS", 300)
    impatient = SqlStorage(make_engine(pg_database.url))
    with pg_storage.transaction():
        with pytest.raises(StorageUnavailable) as raised, impatient.transaction():
            pass
        assert raised.value.detail == "database: OperationalError"
    with impatient.transaction() as tx:  # the lock is free again, the pool still works
        assert tx.audit_head().seq == 0
    impatient._engine.dispose()


def test_every_connection_runs_in_utc_with_bounded_waits(
    pg_database: PgDatabase, hsm: Pkcs11Hsm
) -> None:
    pg_database.execute(f"ALTER DATABASE {pg_database.name} SET timezone = 'Asia/Kolkata'")
    storage = SqlStorage(make_engine(pg_database.url), RowSeals(hsm))
    with anchored(storage, hsm):  # as kms init: sealed rows are read only then
        with storage.transaction() as tx:
            tx.add_key(_key())
            tx.add_version(KeyVersion("k1", 1, NOW, b"w" * 40))
            conn = tx._c
            settings = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar()
                for name in ("timezone", "lock_timeout", "statement_timeout", "application_name")
            }
        with storage.reader() as tx:
            key = tx.key_by_id("k1")
    storage._engine.dispose()
    assert settings == {
        "timezone": "UTC",
        "lock_timeout": "5s",
        "statement_timeout": "15s",
        "application_name": "kms",
    }
    assert key is not None and key.created_at == NOW and key.created_at.utcoffset() is not None


def test_synchronous_commit_off_is_warned_about(
    pg_database: PgDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    def warnings_on_connect() -> list[str]:
        caplog.clear()
        engine = make_engine(pg_database.url)
        with caplog.at_level(logging.WARNING, "kms.storage"), engine.connect():
            pass
        engine.dispose()
        return [r.getMessage() for r in caplog.records if r.name == "kms.storage"]

    assert warnings_on_connect() == []
    pg_database.execute(f"ALTER DATABASE {pg_database.name} SET synchronous_commit = off")
    assert any("synchronous_commit is off" in m for m in warnings_on_connect())


def test_a_bare_postgresql_url_uses_psycopg(pg_database: PgDatabase) -> None:
    engine = make_engine(pg_database.url.replace("postgresql+psycopg://", "postgresql://"))
    assert engine.dialect.driver == "psycopg"
    with SqlStorage(engine).reader() as tx:
        assert tx.audit_head().seq == 0
    engine.dispose()


def test_a_wrong_password_is_503_without_the_password(pg_database: PgDatabase) -> None:
    password = pg_database.cluster.password
    storage = SqlStorage(make_engine(pg_database.url.replace(password, "wrong-pw-123")))
    with pytest.raises(StorageUnavailable) as raised:
        storage.check()
    text = f"{raised.value} {raised.value.detail}"
    assert "wrong-pw-123" not in text and password not in text
    storage._engine.dispose()


def test_purge_after_erasure_leaves_no_tuple_holding_the_material(
    pg_database: PgDatabase, pg_storage: SqlStorage
) -> None:
    material = b"wrapped-kek-material-" + b"\x5a" * 24
    with pg_storage.transaction() as tx:
        tx.add_key(_key())
        tx.add_version(KeyVersion("k1", 1, NOW, material))
    with pg_storage.transaction() as tx:
        assert tx.destroy_versions("k1") == 1

    # deleted, but its dead tuple is still on the page
    assert pg_database.tuples_holding("key_versions", material) == 1
    pg_storage.purge_erased()
    assert pg_database.tuples_holding("key_versions", material) == 0


def test_the_start_up_check_tolerates_only_an_unreachable_database(
    pg_cluster: PgCluster, pg_database: PgDatabase
) -> None:
    down = make_engine(pg_database.url.replace(str(pg_cluster.port), str(free_port())))
    current = make_engine(pg_database.url)
    empty_name = fresh_name("kms_empty")
    pg_cluster.create_database(empty_name)
    empty = make_engine(pg_cluster.url(empty_name))
    try:
        assert check_current_if_reachable(down) is False
        assert check_current_if_reachable(current) is True
        with pytest.raises(SchemaNotCurrent):
            check_current_if_reachable(empty)
    finally:
        for engine in (down, current, empty):
            engine.dispose()
        pg_cluster.drop_database(empty_name)

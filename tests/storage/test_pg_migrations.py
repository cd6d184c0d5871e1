"""The same Alembic migrations on PostgreSQL: they produce schema.py exactly, upgrade a
populated database in place, take turns when two nodes migrate at once, and ``kms
migrate`` / the start-up check work against a PostgreSQL URL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from kms.backends.storage import SchemaNotCurrent, make_engine, migrate, upgrade
from kms.backends.storage.migrate import check_current
from kms.backends.storage.schema import metadata
from tests.helpers import (
    assert_audit_chain_kept,
    check_0013_on,
    extra_revision,
    free_port,
    run_kms,
    write_audit_chain_at_0001,
)
from tests.pg import PgCluster, PgDatabase, fresh_name


@pytest.fixture
def empty_db(pg_cluster: PgCluster):  # type: ignore[no-untyped-def]
    """A database with no schema at all (not a copy of the migrated template)."""
    name = fresh_name("kms_empty")
    pg_cluster.create_database(name)
    yield PgDatabase(pg_cluster, name)
    pg_cluster.drop_database(name)


def test_migrations_match_the_schema_module(empty_db: PgDatabase) -> None:
    engine = make_engine(empty_db.url)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_in_place_keeps_data(empty_db: PgDatabase, tmp_path: Path) -> None:
    engine = make_engine(empty_db.url)
    upgrade(engine, target="0001")  # a database made by the first release
    with engine.begin() as conn:  # data written at schema 0001 (raw SQL, as of then)
        conn.execute(
            sa.text(
                "INSERT INTO keys VALUES ('k1', 'kept', 'enabled', 1, '2026-01-01 00:00:00Z', NULL)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO key_versions VALUES ('k1', 1, 'w', 'kms-root', '2026-01-01 00:00:00Z')"
            )
        )
        chain = write_audit_chain_at_0001(conn)
    versions = extra_revision(tmp_path)
    upgrade(engine, extra_versions=[versions])  # every real revision, then 9001
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT description, owner, rotated_at FROM keys")).one()
        assert row[:2] == ("kept", None) and row[2].isoformat() == "2026-01-01T00:00:00+00:00"
        head_row = conn.execute(sa.text("SELECT seq, hash, checkpoint_seq FROM audit_head")).one()
        assert tuple(head_row) == (3, chain[-1]["hash"], 0)
        assert_audit_chain_kept(conn, chain)
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "9001"
    upgrade(engine, extra_versions=[versions])  # idempotent
    engine.dispose()


def test_0013_records_the_legacy_wrap_mechanism_of_existing_keks(empty_db: PgDatabase) -> None:
    check_0013_on(make_engine(empty_db.url))


def test_concurrent_upgrades_take_turns(empty_db: PgDatabase) -> None:
    """Three nodes running ``kms init`` at once on an empty database."""
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def migrate_one() -> None:
        engine = make_engine(empty_db.url)
        start.wait()
        try:
            upgrade(engine)
        except BaseException as e:
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=migrate_one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    heads = ScriptDirectory.from_config(migrate._config()).get_heads()
    assert empty_db.execute("SELECT version_num FROM alembic_version") == [(h,) for h in heads]
    assert empty_db.execute("SELECT id, seq FROM audit_head") == [(1, 0)]  # one head row


def test_kms_migrate_and_the_start_up_check(empty_db: PgDatabase, data_dir: Path) -> None:
    engine = make_engine(empty_db.url)
    with pytest.raises(SchemaNotCurrent, match="kms migrate"):
        check_current(engine)
    done = run_kms("migrate", "--data-dir", str(data_dir), env={"KMS_DATABASE_URL": empty_db.url})
    check_current(engine)  # the schema is upgraded ...
    engine.dispose()
    # ... but the session's token already anchors the audit chain of another database, so
    # migrate does not anchor this one next to it: that is an operator's decision
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "already anchors 1 other audit chain" in done.stderr and "accept-state" in done.stderr


def test_kms_migrate_against_a_stopped_server_is_a_clear_error(
    pg_cluster: PgCluster, data_dir: Path
) -> None:
    url = pg_cluster.url("kms").replace(str(pg_cluster.port), str(free_port()))
    done = run_kms("migrate", "--data-dir", str(data_dir), env={"KMS_DATABASE_URL": url})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "OperationalError" in done.stderr
    assert pg_cluster.password not in done.stderr + done.stdout

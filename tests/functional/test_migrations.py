"""Schema migrations upgrade an existing database in place; the app refuses an old one."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from kms import config
from kms.app import create_app
from kms.backends.storage import SchemaNotCurrent, make_engine, upgrade
from kms.backends.storage.schema import metadata
from tests.helpers import (
    assert_audit_chain_kept,
    check_0013_on,
    extra_revision,
    write_audit_chain_at_0001,
)


def test_migrations_match_the_schema_module(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_upgrade_in_place_keeps_data(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    upgrade(engine, target="0001")  # a database made by the first release
    with engine.begin() as conn:  # data written at schema 0001 (raw SQL, as of then)
        conn.execute(
            sa.text(
                "INSERT INTO keys VALUES ('k1', 'kept', 'enabled', 1, '2026-01-01 00:00:00', NULL)"
            )
        )
        chain = write_audit_chain_at_0001(conn)
    versions = extra_revision(tmp_path)
    upgrade(engine, extra_versions=[versions])  # 0002 (real) and 9001 (made here)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT description, owner FROM keys")).one()
        assert tuple(row) == ("kept", None)
        head = conn.execute(sa.text("SELECT seq, hash, checkpoint_seq FROM audit_head")).one()
        assert tuple(head) == (3, chain[-1]["hash"], 0)  # 0002 added checkpoint_seq
        assert_audit_chain_kept(conn, chain)
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "9001"
    upgrade(engine, extra_versions=[versions])  # idempotent
    engine.dispose()


def test_0013_records_the_legacy_wrap_mechanism_of_existing_keks(tmp_path: Path) -> None:
    check_0013_on(make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}"))


def test_app_refuses_a_database_that_is_not_current(
    tmp_path: Path, settings: config.Settings
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    with pytest.raises(SchemaNotCurrent, match="kms migrate"):
        create_app(config.Settings(**{**settings.__dict__, "database_url": url}))

"""tests/functional/test_key_lifecycle.py again, on PostgreSQL: rotation policy,
retirement, usage, scheduled deletion. The two tests that open the SQLite file have
their PostgreSQL versions here (erasure checked on the table's pages; a real refusal of
the database by a trigger)."""

from __future__ import annotations

from typing import Any

import pytest

from kms.backends.storage import SqlStorage
from tests.functional import test_key_lifecycle as base
from tests.pg import PgDatabase, rerun

globals().update(
    rerun(
        base,
        skip={
            "test_scheduled_deletion_destroys_material_after_the_waiting_period",
            "test_a_scheduler_run_that_fails_halfway_leaves_no_half_rotated_key",
        },
    )
)
DAY = base.DAY


@pytest.fixture
def storage(pg_storage: SqlStorage) -> SqlStorage:
    return pg_storage


def test_scheduled_deletion_destroys_material_after_the_waiting_period(
    w: Any, pg_database: PgDatabase
) -> None:
    key_id = w.api.key("k", grant=w.svc)
    blob = w.datakey("k")["ciphertext"]
    assert w.api.call("POST", "/v1/keys/k/rotate", w.api.admin).status_code == 200
    material = [bytes(m) for (m,) in pg_database.execute("SELECT wrapped_kek FROM key_versions")]
    assert len(material) == 2
    w.delete_after_waiting("k", key_id, blob)
    refused = w.api.call("POST", "/v1/decrypt", w.svc, json={"ciphertext": blob})
    assert refused.status_code == 409 and refused.json["error"]["code"] == "key_state"
    assert pg_database.execute("SELECT count(*) FROM key_versions") == [(0,)]
    # The scheduler's VACUUM removed the dead tuples too: no row version, live or dead,
    # holds the material any more (copies in the WAL and in backups remain: SECURITY.md).
    assert [pg_database.tuples_holding("key_versions", m) for m in material] == [0, 0]
    destroyed = [r for r in w.api.audit() if r["operation"] == "destroy_key"]
    assert len(destroyed) == 1 and destroyed[0]["detail"] == "versions erased: 2"


def test_a_scheduler_run_that_fails_halfway_leaves_no_half_rotated_key(
    w: Any, pg_database: PgDatabase
) -> None:
    ids = [w.api.key(f"k{i}", grant=w.svc) for i in range(3)]
    for i in range(3):
        assert w.config(f"k{i}", rotation_period_days=1).status_code == 200
    w.clock.advance(DAY)
    pg_database.refuse_inserts("key_versions", when=f"NEW.key_id = '{ids[1]}'")
    run = w.run_due()
    assert sorted(k for k, _ in run.rotated) == sorted([ids[0], ids[2]])
    assert run.failed == [(ids[1], "storage_unavailable")]
    rows = dict(pg_database.execute("SELECT key_id, count(*) FROM key_versions GROUP BY key_id"))
    current = dict(pg_database.execute("SELECT key_id, current_version FROM keys"))
    assert rows == current == {ids[0]: 2, ids[1]: 1, ids[2]: 2}  # every version is usable
    pg_database.accept_inserts("key_versions")
    assert w.run_due().rotated == [(ids[1], 2)]  # the next run finishes the job
    assert w.decrypt(w.datakey("k1")["ciphertext"]).status_code == 200


def test_the_tests_of_this_module_run_on_postgresql(w: Any, pg_database: PgDatabase) -> None:
    key_id = w.api.key("written-to-postgresql")
    assert pg_database.execute("SELECT key_id, state FROM keys") == [(key_id, "enabled")]

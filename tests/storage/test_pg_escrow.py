"""tests/functional/test_escrow.py again, on PostgreSQL: cases, quorum, waiting period,
scope, budget, notifications. The two tests that edit the SQLite file have their
PostgreSQL versions here: a database edit cannot activate, widen or refill a case, nor
swap a custodian's key (the rows are sealed by the HSM)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms.backends.storage import SqlStorage
from tests.functional import test_escrow as base
from tests.pg import PgDatabase, rerun

globals().update(
    rerun(
        base,
        skip={
            "test_a_database_edit_cannot_activate_widen_or_refill_a_case",
            "test_a_swapped_custodian_key_cannot_approve",
        },
    )
)


@pytest.fixture
def storage(pg_storage: SqlStorage) -> SqlStorage:
    return pg_storage


def test_a_database_edit_cannot_activate_widen_or_refill_a_case(
    world: Any, pg_database: PgDatabase
) -> None:
    def db(sql: str, *params: object) -> None:
        assert pg_database.run(sql, *params) == 1

    pending = world.file()["case_id"]
    db(
        "UPDATE escrow_cases SET state = 'active', active_from = '2000-01-01T00:00:00.000Z'"
        " WHERE case_id = %s",
        pending,
    )
    world.refused(world.unwrap(pending))  # the row fails its HSM seal
    assert "seal" in world.api.audit()[-1]["detail"]
    active = base._active(world)
    assert world.unwrap(active).status_code == 200
    assert world.unwrap(active).status_code == 200  # budget of 2 used up
    db("UPDATE escrow_cases SET unwraps_used = 0 WHERE case_id = %s", active)
    world.refused(world.unwrap(active))  # refilling the budget breaks the seal
    widened = base._active(world)
    db(
        "UPDATE escrow_cases SET scope = replace(scope, %s, %s) WHERE case_id = %s",
        '"patient": "p0"',
        '"patient": "p1"',
        widened,
    )
    world.refused(world.unwrap(widened, 1))


def test_a_swapped_custodian_key_cannot_approve(world: Any, pg_database: PgDatabase) -> None:
    forger = Ed25519PrivateKey.generate()
    raw = forger.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert pg_database.run("UPDATE custodians SET public_key = %s WHERE name = 'dpo'", raw) == 1
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    world.refused(world.decide(cid, "dpo", key=forger))
    assert world.case(cid)["state"] == "pending"


def test_the_tests_of_this_module_run_on_postgresql(world: Any, pg_database: PgDatabase) -> None:
    case_id = world.file()["case_id"]
    assert pg_database.execute("SELECT case_id, state FROM escrow_cases") == [(case_id, "pending")]

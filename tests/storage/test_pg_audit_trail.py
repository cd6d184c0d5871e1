"""tests/functional/test_audit_trail.py again, on PostgreSQL: checkpoints, export, the
offline verifier's tamper battery, reports, archiving. The live-database tamper battery
runs here with PostgreSQL's SQL; and the fail-closed rule: an audit append the database
refuses refuses the operation, and changes nothing."""

from __future__ import annotations

import pytest

from kms.backends.storage import SqlStorage
from tests.functional import test_audit_trail as base
from tests.helpers import Api
from tests.pg import PgDatabase, rerun

globals().update(rerun(base, skip={"test_tamper_battery_on_the_live_database"}))


@pytest.fixture
def storage(pg_storage: SqlStorage) -> SqlStorage:
    return pg_storage


@pytest.mark.parametrize("case", sorted(base.LIVE))
def test_tamper_battery_on_the_live_database(
    api: Api, svc: dict[str, str], pg_database: PgDatabase, case: str
) -> None:
    lines, pem = base._battery(api, svc)
    newest = [x for x in lines if x["type"] == "checkpoint"][-1]
    held = {k: v for k, v in newest.items() if k != "type"}  # the auditor kept it
    statements, expected = base.LIVE[case]
    pg_database.execute(*statements)
    report = base.verify(base.export(api), pem, through=held)
    assert not report.ok
    assert any(expected in e for e in report.errors), report.errors


def test_no_operation_without_its_audit_record(api: Api, pg_database: PgDatabase) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    keys_before = api.call("GET", "/v1/keys", api.admin).json
    records_before = len(api.audit())
    pg_database.refuse_inserts("audit_records")
    refused = [
        api.call("POST", "/v1/keys/k/datakey", svc, json={}),
        api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}),
        api.call("POST", "/v1/keys", api.admin, json={"alias": "new"}),
        api.call("POST", "/v1/keys/k/rotate", api.admin),
        api.call("POST", "/v1/keys/k/disable", api.admin),
        api.call("POST", "/v1/principals", api.admin, json={"name": "p", "role": "auditor"}),
    ]
    for r in refused:
        assert r.status_code == 503 and r.json["error"]["code"] == "storage_unavailable"
        assert "plaintext" not in r.json and "disk full" not in r.get_data(as_text=True)
    pg_database.accept_inserts("audit_records")
    assert api.call("GET", "/v1/keys", api.admin).json == keys_before  # nothing changed
    assert len(api.audit()) == records_before
    assert api.call("POST", "/v1/decrypt", svc, json={"ciphertext": blob}).status_code == 200


def test_the_tests_of_this_module_run_on_postgresql(api: Api, pg_database: PgDatabase) -> None:
    api.principal("auditor", "written-to-postgresql")
    found = pg_database.execute("SELECT role FROM principals WHERE name = 'written-to-postgresql'")
    assert found == [("auditor",)]

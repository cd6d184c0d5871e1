"""The audit chain's HSM anchor against a database writer (issue 15, attack 2), with real
servers, a real SoftHSM token and SQLite or PostgreSQL: a laundered history (checkpoints
deleted, records deleted, the rest re-chained with the public hash function, the head
reset) is refused at start-up instead of signed, until an operator accepts the state with
``kms audit accept-state``, which is itself chained and signed."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from kms.backends.storage import schema as t
from kms.client import KmsClient
from kms.formats import audit_record
from kms.services.audit import RECHECK_SECONDS
from tests.helpers import Server, gunicorn_server, init_data_dir, run_kms
from tests.storage.test_pg_nodes import init as init_pg

pytestmark = pytest.mark.e2e


def _activity(srv: Server) -> dict[str, str]:
    """A service that encrypts under key ``k``; a signed checkpoint covering it all."""
    admin = KmsClient(srv.url, srv.admin_token)
    token = admin.create_principal("app", "service")["token"]
    admin.create_key("k")
    admin.grant("k", "app", ["encrypt", "decrypt"])
    app = KmsClient(srv.url, token)
    for i in range(3):
        app.encrypt("k", f"secret {i}".encode(), context={"patient": f"p-{i}"})
    srv.kms("audit", "checkpoint")
    return {"Authorization": f"Bearer {token}"}


def launder(engine: sa.Engine, unwanted: str) -> int:
    """Attack 2, as a database writer with the server stopped: delete every checkpoint and
    every record of operation ``unwanted``, re-chain the rest with the public record-hash
    function (padded with harmless-looking reads so the head is not shorter than before),
    reset the head. Returns the number of records deleted."""
    r = t.audit_records.c
    with engine.begin() as c:
        rows = [row._asdict() for row in c.execute(sa.select(t.audit_records).order_by(r.seq))]
        kept = [row for row in rows if row["operation"] != unwanted]
        pad = {**kept[-1], "operation": "read_audit", "key_id": None}
        kept += [pad | {"request_id": f"pad-{i}"} for i in range(len(rows) - len(kept) + 2)]
        c.execute(sa.delete(t.audit_checkpoints))
        c.execute(sa.delete(t.audit_records))
        prev = audit_record.GENESIS_HASH
        for seq, row in enumerate(kept, start=1):
            body = {k: v for k, v in row.items() if k != "hash"} | {"seq": seq, "prev_hash": prev}
            prev = audit_record.record_hash(body)
            c.execute(sa.insert(t.audit_records).values(body | {"hash": prev}))
        c.execute(sa.update(t.audit_head).values(seq=len(kept), hash=prev, checkpoint_seq=0))
    return sum(row["operation"] == unwanted for row in rows)


def _start_refused(data_dir: Path) -> Any:
    """Start a server on a data directory whose chain does not extend its anchor; it must
    run (liveness) but not be ready, and refuse audited operations."""
    return gunicorn_server(data_dir, workers=2, ready=False)


def _assert_refusing(srv: Server, svc: dict[str, str]) -> None:
    ready = requests.get(srv.url + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["audit_anchor"] == "audit_state_refused"
    r = requests.post(
        srv.url + "/v1/keys/k/encrypt", json={"plaintext": "AA=="}, headers=svc, timeout=10
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_state_refused"
    r = requests.post(
        srv.url + "/v1/audit/checkpoints",
        headers={"Authorization": f"Bearer {srv.admin_token}"},
        timeout=10,
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_state_refused"
    assert "does not contain the HSM anchor" in srv.log_text()


def _accept_and_resume(srv: Server, svc: dict[str, str], tmp_path: Path) -> None:
    done = run_kms(
        "audit", "accept-state", "--data-dir", str(srv.data_dir), "--reason", "INC-42", "--yes"
    )
    assert done.returncode == 0, done.stderr
    assert "does not contain the HSM anchor" in done.stdout and "accepted" in done.stdout
    deadline = time.monotonic() + 10  # refusing workers ask the HSM again every 2 s
    while requests.get(srv.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the server did not resume after accept-state"
        time.sleep(0.2)
    time.sleep(RECHECK_SECONDS)  # every worker has asked the HSM again by now
    r = requests.post(
        srv.url + "/v1/keys/k/encrypt", json={"plaintext": "AA=="}, headers=svc, timeout=10
    )
    assert r.status_code == 200
    admin = KmsClient(srv.url, srv.admin_token)
    (accepted,) = admin.audit(after=0, limit=1000, operation="accept_audit_state")
    assert (
        "does not contain the HSM anchor" in accepted["detail"] and "INC-42" in accepted["detail"]
    )
    srv.kms("audit", "checkpoint")
    srv.export_and_verify(tmp_path)  # the accepted chain verifies from its first record


def _attack_2(data_dir: Path, engine: sa.Engine, tmp_path: Path) -> None:
    with gunicorn_server(data_dir, workers=2) as srv:
        svc = _activity(srv)
    assert launder(engine, "encrypt") == 3
    with _start_refused(data_dir) as srv:
        _assert_refusing(srv, svc)
        with engine.connect() as c:  # nothing was signed over the forged head
            assert (
                c.execute(sa.select(sa.func.count()).select_from(t.audit_checkpoints)).scalar() == 0
            )
        _accept_and_resume(srv, svc, tmp_path)


def test_laundered_history_is_refused_on_sqlite(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    engine = sa.create_engine(f"sqlite:///{data / 'kms.sqlite3'}")
    try:
        _attack_2(data, engine, tmp_path)
    finally:
        engine.dispose()


def test_laundered_history_is_refused_on_postgresql(tmp_path: Path, pg_database: Any) -> None:
    data = init_pg(tmp_path / "data", pg_database.url)
    engine = sa.create_engine(pg_database.url)
    try:
        _attack_2(data, engine, tmp_path)
    finally:
        engine.dispose()


def test_an_older_database_under_a_newer_anchor_needs_accept_state(tmp_path: Path) -> None:
    """A restore of the database alone from an older copy (a real HSM keeps its newer
    anchor): refused as behind the anchor, then accepted by the documented command."""
    data = init_data_dir(tmp_path / "data")
    old = tmp_path / "old.sqlite3"
    with gunicorn_server(data, workers=1) as srv:
        svc = _activity(srv)
        with sqlite3.connect(data / "kms.sqlite3") as live, sqlite3.connect(old) as copy:
            live.backup(copy)  # the "backup" of the database alone
        srv.kms("audit", "checkpoint")
        KmsClient(srv.url, srv.admin_token).create_key("later")
        srv.kms("audit", "checkpoint")
    for suffix in ("-wal", "-shm"):
        (data / f"kms.sqlite3{suffix}").unlink(missing_ok=True)
    shutil.copy(old, data / "kms.sqlite3")
    with _start_refused(data) as srv:
        ready = requests.get(srv.url + "/readyz", timeout=10).json()
        assert ready["checks"]["audit_anchor"] == "audit_state_refused"
        assert "behind the HSM anchor" in srv.log_text()
        _accept_and_resume_behind(srv, svc)


def _accept_and_resume_behind(srv: Server, svc: dict[str, str]) -> None:
    done = run_kms(
        "audit", "accept-state", "--data-dir", str(srv.data_dir), "--reason", "restore", "--yes"
    )
    assert done.returncode == 0, done.stderr
    assert "behind the HSM anchor" in done.stdout
    deadline = time.monotonic() + 10
    while requests.get(srv.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(RECHECK_SECONDS)
    r = requests.post(
        srv.url + "/v1/keys/k/encrypt", json={"plaintext": "AA=="}, headers=svc, timeout=10
    )
    assert r.status_code == 200

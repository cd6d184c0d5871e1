"""The auditor's state export against a real gunicorn server (2 workers), a real SoftHSM
token and SQLite: ``kms audit export-state`` on the server host while the server runs,
then ``kms audit export`` and ``kms audit verify --state`` offline. A grant rolled back in
the database afterwards, and not used, stops the next checkpoint (503 state_refused, the
kms_state_refused_total alarm) and the next state export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from kms.backends.storage import schema as t
from kms.client import KmsClient
from tests.helpers import Server, gunicorn_server, init_data_dir, run_kms

pytestmark = pytest.mark.e2e


def _refusals(srv: Server) -> float:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    found = re.search(r"^kms_state_refused_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_export_state_beside_the_bundle_and_a_rollback_at_the_next_checkpoint(
    tmp_path: Path,
) -> None:
    data = init_data_dir(tmp_path / "data")
    engine = sa.create_engine(f"sqlite:///{data / 'kms.sqlite3'}")
    grants = t.grants.c
    try:
        with gunicorn_server(data, workers=2) as srv:
            admin = KmsClient(srv.url, srv.admin_token)
            token = admin.create_principal("app", "service")["token"]
            admin.create_key("k")
            admin.grant("k", "app", ["encrypt", "decrypt"])
            with engine.connect() as c:
                older = c.execute(sa.select(t.grants)).one()._asdict()  # as a backup has it
            admin.grant("k", "app", ["encrypt"])  # decrypt revoked
            KmsClient(srv.url, token).encrypt("k", b"x", {"patient": "p-1"})

            state = tmp_path / "state.json"
            done = run_kms("audit", "export-state", "--data-dir", str(data), "--out", str(state))
            assert done.returncode == 0, done.stderr
            bundle, report = srv.export_and_verify(tmp_path)  # made after the state export
            assert report.rstrip().endswith("VERIFIED")
            verify = ("audit", "verify", str(bundle), "--public-key", str(tmp_path / "audit.pem"))
            done = run_kms(*verify, "--state", str(state))
            assert done.returncode == 0, done.stdout + done.stderr
            n = json.loads(state.read_text())["state_seq"]
            assert f"sealed rows at state change {n} match the signed checkpoint" in done.stdout
            assert done.stdout.rstrip().endswith("VERIFIED")

            # the database writer puts the older grant back; nobody uses it
            with engine.begin() as c:
                c.execute(
                    sa.update(t.grants)
                    .where(grants.key_id == older["key_id"])
                    .values(operations=older["operations"], seal=older["seal"])
                )
            before = _refusals(srv)
            r = requests.post(
                srv.url + "/v1/audit/checkpoints",
                headers={"Authorization": f"Bearer {srv.admin_token}"},
                json={},
                timeout=10,
            )
            assert (r.status_code, r.json()["error"]["code"]) == (503, "state_refused")
            assert _refusals(srv) > before
            assert "sealed state refused" in srv.log_text()
            again = tmp_path / "again.json"
            done = run_kms("audit", "export-state", "--data-dir", str(data), "--out", str(again))
            assert done.returncode == 1 and "state_refused" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr and not again.exists()
    finally:
        engine.dispose()

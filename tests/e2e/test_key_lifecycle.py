"""The rotation scheduler raced by two real processes and run inside a real gunicorn, and
crypto-shredding checked from every side: API, SDK, the database files and the HSM."""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from kms.client import KmsClient, KmsClientError, decrypt_bytes, encrypt_bytes
from tests.helpers import gunicorn_server, run_kms, update_keys

pytestmark = pytest.mark.e2e


def _make_due(data_dir: Path) -> None:
    """Test set-up: pretend every current version was made two days ago."""
    update_keys(data_dir, rotated_at=datetime.now(UTC) - timedelta(days=2))


def _versions(db: Path) -> dict[str, tuple[int, int]]:
    """key id -> (current_version, number of version rows)."""
    with sqlite3.connect(db) as conn:
        return {
            k: (cur, n)
            for k, cur, n in conn.execute(
                "SELECT k.key_id, k.current_version, count(v.version) FROM keys k "
                "LEFT JOIN key_versions v ON v.key_id = k.key_id GROUP BY k.key_id"
            )
        }


def _in_subprocess(code: str) -> str:
    """Run set-up code against a data directory in a fresh process: a process holds one
    SoftHSM configuration, and this one may already have loaded another."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_racing_schedulers_rotate_each_due_key_exactly_once(fresh_data_dir: Path) -> None:
    n = 40
    _in_subprocess(SET_UP.format(data_dir=str(fresh_data_dir), n=n))
    db = fresh_data_dir / "kms.sqlite3"
    _make_due(fresh_data_dir)
    # Hold the database writer lock while both start, so that both read the full due set
    # before either can write: every key is then attempted by both processes.
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "kms", "rotate-due", "--data-dir", str(fresh_data_dir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        time.sleep(4)  # both processes start, log in to the HSM and read the due set
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    rotated = [
        line for out, _ in outputs for line in out.splitlines() if line.startswith("rotated")
    ]
    assert len(rotated) == n  # each key once in all
    summaries = [out.splitlines()[-1] for out, _ in outputs]
    skipped = sum(int(s.split(", ")[2].split()[0]) for s in summaries)
    assert skipped == n, summaries  # ... and each was also attempted (and skipped) by the other
    assert set(_versions(db).values()) == {(2, 2)}
    with sqlite3.connect(db) as conn:
        records = conn.execute(
            "SELECT key_id, principal FROM audit_records WHERE operation = 'rotate_key'"
        ).fetchall()
    assert len(records) == n and len({k for k, _ in records}) == n
    assert {p for _, p in records} == {"system:scheduler"}
    done = run_kms("rotate-due", "--data-dir", str(fresh_data_dir))
    assert done.returncode == 0 and done.stdout.strip().endswith("0 failed")
    assert done.stdout.startswith("0 rotated")


def test_server_scheduler_rotates_a_due_key_once_across_workers(fresh_data_dir: Path) -> None:
    with gunicorn_server(fresh_data_dir, workers=2, env={"KMS_SCHEDULER_SECONDS": "1"}) as srv:
        admin = {"Authorization": f"Bearer {srv.admin_token}"}
        key = requests.post(f"{srv.url}/v1/keys", json={"alias": "k"}, headers=admin, timeout=10)
        key_id = key.json()["key_id"]
        r = requests.post(
            f"{srv.url}/v1/keys/k/config",
            json={"rotation_period_days": 1},
            headers=admin,
            timeout=10,
        )
        assert r.status_code == 200
        _make_due(fresh_data_dir)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            shown = requests.get(f"{srv.url}/v1/keys/k", headers=admin, timeout=10).json()
            if shown["current_version"] == 2:
                break
            time.sleep(0.2)
        time.sleep(3)  # both workers run several more passes
        shown = requests.get(f"{srv.url}/v1/keys/k", headers=admin, timeout=10).json()
        assert shown["current_version"] == 2
        assert shown["next_rotation"] > datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        records = requests.get(
            f"{srv.url}/v1/audit?operation=rotate_key", headers=admin, timeout=10
        ).json()["records"]
        assert [(r["key_id"], r["outcome"]) for r in records] == [(key_id, "ok")]


SET_UP = """
from datetime import UTC, datetime
from pathlib import Path
from kms.bootstrap import open_services
from kms.services.audit_events import Caller
from kms.services.model import Principal, Role
admin = Principal(1, "admin", Role.ADMIN, datetime(2026, 1, 1, tzinfo=UTC))
with open_services(Path({data_dir!r})) as services:
    for i in range({n}):
        key = services.keys.create(Caller(f"set-up-{{i}}", admin), f"due-{{i}}", "")
        services.keys.configure(Caller(f"cfg-{{i}}", admin), key.key_id, 1)
"""

HSM_LABELS = """
from pkcs11 import Attribute
from kms import config
from kms.app import hsm_config
from kms.backends.hsm import Pkcs11Hsm
hsm = Pkcs11Hsm(hsm_config(config.from_env({{"KMS_DATA_DIR": {data_dir!r}}})))
print(sorted(hsm._call(lambda c: [o[Attribute.LABEL] for o in c.session.get_objects()])))
hsm.close()
"""


def _hsm_labels(data_dir: Path) -> str:
    """The labels of every object a fresh HSM session sees on the token."""
    return _in_subprocess(HSM_LABELS.format(data_dir=str(data_dir))).strip()


def test_crypto_shredding_leaves_no_path_to_the_data(fresh_data_dir: Path) -> None:
    db = fresh_data_dir / "kms.sqlite3"
    with gunicorn_server(fresh_data_dir, workers=2) as srv:
        admin = KmsClient(srv.url, srv.admin_token)
        svc_token = admin.create_principal("records-svc", "service")["token"]
        key_id = admin.create_key("records")["key_id"]
        admin.grant("records", "records-svc", ["datakey", "decrypt", "rewrap"])
        svc = KmsClient(srv.url, svc_token)
        sealed = encrypt_bytes(svc, "records", b"patient 7: diagnosis", context={"p": "7"})
        assert decrypt_bytes(svc, sealed, context={"p": "7"}) == b"patient 7: diagnosis"
        admin.key_action("records", "rotate")
        sealed_v2 = encrypt_bytes(svc, "records", b"patient 8", context={"p": "8"})
        with sqlite3.connect(db) as conn:
            material = [bytes(r[0]) for r in conn.execute("SELECT wrapped_kek FROM key_versions")]
        assert len(material) == 2
        labels_before = _hsm_labels(fresh_data_dir)

        admin.key_action("records", "schedule-deletion", {"pending_days": 7})
        # test set-up: the waiting period is over
        update_keys(fresh_data_dir, key_id, deletion_date=datetime(2026, 1, 1, tzinfo=UTC))
        done = run_kms("rotate-due", "--data-dir", str(fresh_data_dir))
        assert done.returncode == 0, done.stderr
        assert "1 destroyed" in done.stdout
        assert admin.get_key("records")["state"] == "destroyed"

        # API and SDK: refused, whatever the version or path.
        for blob, ctx in ((sealed, {"p": "7"}), (sealed_v2, {"p": "8"})):
            with pytest.raises(KmsClientError) as e:
                decrypt_bytes(svc, blob, context=ctx)
            assert e.value.code == "key_state"
        with pytest.raises(KmsClientError):
            svc.datakey("records")
        # Database: no version rows, and the wrapped material is in no file of it.
        assert _versions(db) == {admin.get_key("records")["key_id"]: (2, 0)}
        raw = b"".join(p.read_bytes() for p in fresh_data_dir.glob("kms.sqlite3*"))
        assert all(m not in raw for m in material)
        # HSM: KEKs were never token objects, so nothing per key remains there either.
        anchors = r"kms-(audit|state)-anchor-[0-9a-f]{32}"
        labels = re.sub(anchors, r"kms-\1-anchor", _hsm_labels(fresh_data_dir))
        expected = (
            "['kms-audit-anchor', 'kms-audit-signing', 'kms-audit-signing', 'kms-integrity', "
            "'kms-root', 'kms-state-anchor']"
        )
        before = re.sub(anchors, r"kms-\1-anchor", labels_before)
        # the chain's and the sealed state's anchors, audit key pair, integrity, root
        assert labels == before == expected
        records = admin.audit(operation="destroy_key")
        assert [r["detail"] for r in records] == ["versions erased: 2"]

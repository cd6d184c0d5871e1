"""Backup and restore drill with the real ``kms backup`` / ``kms restore`` and real servers:
data encrypted before an online backup decrypts after restoring into a fresh directory
(the original deleted); keys and versions made after the backup are refused, clearly."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests

from kms.client import KmsClient
from tests.helpers import Server, b64, gunicorn_server, init_data_dir, run_kms

pytestmark = pytest.mark.e2e


def _kms_ok(*args: str, env: dict[str, str] | None = None) -> str:
    done = run_kms(*args, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _kms_fails(*args: str, env: dict[str, str] | None = None) -> str:
    done = run_kms(*args, env=env)
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def _decrypt(srv: Server, token: str, blob: str, ctx: dict[str, str]) -> requests.Response:
    return requests.post(
        srv.url + "/v1/decrypt",
        json={"ciphertext": blob, "context": ctx},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def _record(admin: KmsClient, request_id: str) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    while page := admin.audit(after=out[-1]["seq"] if out else 0, limit=1000):
        out.extend(page)
    (record,) = [r for r in out if r["request_id"] == request_id]
    return record


def test_restore_drill(tmp_path: Path) -> None:
    original = init_data_dir(tmp_path / "original")
    backup, restored = tmp_path / "backup", tmp_path / "restored"
    ctx = {"patient": "p-1"}
    with gunicorn_server(original, workers=2) as srv:
        admin = KmsClient(srv.url, srv.admin_token)
        svc = admin.create_principal("app", "service")
        app = KmsClient(srv.url, svc["token"])
        admin.create_key("old")
        admin.grant("old", "app", ["datakey", "decrypt"])
        before = [app.datakey("old", ctx) for _ in range(3)]
        out = _kms_ok("backup", "--data-dir", str(original), "--out", str(backup))  # online
        assert "holds the HSM PIN" in out
        admin.key_action("old", "rotate")  # version 2 exists only after the backup
        rotated = app.datakey("old", ctx)
        new_key = admin.create_key("new")  # the whole key exists only after the backup
        admin.grant("new", "app", ["datakey", "decrypt"])
        later = app.datakey("new", ctx)
    shutil.rmtree(original)  # the restore must not depend on the original in any way

    out = _kms_ok("restore", str(backup), "--data-dir", str(restored))
    assert "HSM, database and audit key answer" in out and "cannot be decrypted here" in out
    assert (
        f"directories.tokendir = {restored / 'tokens'}" in (restored / "softhsm2.conf").read_text()
    )
    with gunicorn_server(restored, workers=2) as srv:
        admin = KmsClient(srv.url, srv.admin_token)  # the restored admin token
        for dk in before:
            r = _decrypt(srv, svc["token"], b64(dk.ciphertext), ctx)
            assert r.status_code == 200 and r.json()["plaintext"] == b64(dk.plaintext or b"")
        # a key made after the backup does not exist here: refused as a key without a
        # grant (nobody learns whether a key exists); a version made after it cannot open
        for blob, status, code, detail in (
            (later.ciphertext, 403, "forbidden", "blob names an unknown key"),
            (rotated.ciphertext, 400, "decryption_failed", "unknown key version 2"),
        ):
            r = _decrypt(srv, svc["token"], b64(blob), ctx)
            assert r.status_code == status and r.json()["error"]["code"] == code
            record = _record(admin, r.headers["X-Request-Id"])
            assert record["outcome"] == code and record["detail"] == detail
        assert _record(admin, _restore_request_id(admin))["detail"].startswith("backup created ")
        assert new_key["key_id"] not in [k["key_id"] for k in admin.list_keys()]
        bundle, pem = srv.data_dir / "bundle.jsonl", srv.data_dir / "audit.pem"
        env = {"KMS_URL": srv.url, "KMS_TOKEN_FILE": str(restored / "admin.token")}
        _kms_ok("audit", "export", "--out", str(bundle), env=env)
        _kms_ok("audit", "public-key", "--out", str(pem), env=env)
    report = _kms_ok("audit", "verify", str(bundle), "--public-key", str(pem))
    assert "VERIFIED" in report


def _restore_request_id(admin: KmsClient) -> str:
    (record,) = admin.audit(after=0, limit=1000, operation="restore_backup")
    return str(record["request_id"])


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path]:
    """An initialised data directory (no server running) and a backup of it."""
    data = init_data_dir(tmp_path / "data")
    _kms_ok("backup", "--data-dir", str(data), "--out", str(tmp_path / "backup"))
    return data, tmp_path / "backup"


def test_backup_is_private_and_checksummed(backed_up: tuple[Path, Path]) -> None:
    _, backup = backed_up
    assert backup.stat().st_mode & 0o077 == 0
    manifest = json.loads((backup / "MANIFEST.json").read_text())
    assert manifest["format"] == "kms-backup/1" and manifest["audit_head_seq"] >= 1
    assert {"kms.sqlite3", "kms.conf", "hsm.pin", "admin.token"} <= set(manifest["files"])
    assert any(name.startswith("tokens/") for name in manifest["files"])
    with sqlite3.connect(backup / "kms.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert not (backup.parent / "backup.partial").exists()


def test_damaged_backup_is_refused_and_leaves_nothing(
    backed_up: tuple[Path, Path], tmp_path: Path
) -> None:
    _, backup = backed_up
    db = backup / "kms.sqlite3"
    raw = bytearray(db.read_bytes())
    raw[-1] ^= 1
    db.write_bytes(bytes(raw))
    err = _kms_fails("restore", str(backup), "--data-dir", str(tmp_path / "r"))
    assert "backup damaged: kms.sqlite3 does not match its checksum" in err
    assert not (tmp_path / "r").exists()


def test_restore_refuses_a_used_directory_and_backup_an_existing_one(
    backed_up: tuple[Path, Path], tmp_path: Path
) -> None:
    data, backup = backed_up
    err = _kms_fails("restore", str(backup), "--data-dir", str(data))
    assert "is not empty: restore into a new directory" in err
    assert (data / "kms.sqlite3").exists()
    err = _kms_fails("backup", "--data-dir", str(data), "--out", str(backup))
    assert "already exists" in err
    err = _kms_fails("restore", str(tmp_path), "--data-dir", str(tmp_path / "r"))
    assert "not a complete backup" in err


def test_backup_of_another_layout_names_the_documented_procedure(
    backed_up: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = backed_up
    pg = {"KMS_DATABASE_URL": "postgresql+psycopg://kms:secret-pw@127.0.0.1:1/kms"}
    err = _kms_fails("backup", "--data-dir", str(data), "--out", str(tmp_path / "b"), env=pg)
    assert "pg_dump" in err and "secret-pw" not in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()

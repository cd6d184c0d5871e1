"""End to end through a real gunicorn with 2 workers, each with its own PKCS#11 session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.client import KmsClient, KmsClientError, decrypt_file, encrypt_file
from kms.formats import audit_record
from kms.formats import blob as blobfmt
from tests.helpers import Server, b64, gunicorn_server, init_data_dir, unb64

pytestmark = pytest.mark.e2e


def _all_records(client: KmsClient) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    while page := client.audit(after=int(out[-1]["seq"]) if out else 0, limit=1000):  # type: ignore[arg-type]
        out.extend(page)
    return out


@pytest.fixture(scope="module")
def setup(server: Server) -> dict[str, Any]:
    """A service with a key, then 150 concurrent datakey + decrypt pairs (8 clients)."""
    admin = KmsClient(server.url, server.admin_token)
    svc = admin.create_principal("app", "service")
    admin.create_key("patients")
    admin.grant("patients", "app", ["datakey", "encrypt", "decrypt", "rewrap"])
    before = len(_all_records(admin))
    headers = {"Authorization": f"Bearer {svc['token']}"}

    def work(i: int) -> list[tuple[int, str, str | None]]:
        with requests.Session() as s:
            ctx = {"record": str(i)}
            r = s.post(
                f"{server.url}/v1/keys/patients/datakey",
                json={"context": ctx},
                headers=headers,
                timeout=30,
            )
            out = [(r.status_code, r.headers["X-Request-Id"], r.json().get("plaintext"))]
            d = s.post(
                f"{server.url}/v1/decrypt",
                json={"ciphertext": r.json()["ciphertext"], "context": ctx},
                headers=headers,
                timeout=30,
            )
            assert d.json()["plaintext"] == r.json()["plaintext"]
            out.append((d.status_code, d.headers["X-Request-Id"], None))
            return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [x for chunk in pool.map(work, range(150)) for x in chunk]
    return {"admin": admin, "svc_token": svc["token"], "results": results, "before": before}


def test_two_workers_serve_concurrent_requests_with_one_audit_record_each(
    server: Server, setup: dict[str, Any]
) -> None:
    results = setup["results"]
    assert [code for code, _, _ in results] == [200] * 300
    records = _all_records(setup["admin"])
    audit_record.verify_chain(records)  # one linear chain, no forks or gaps
    new = records[setup["before"] :]
    assert sorted(r["request_id"] for r in new) == sorted(rid for _, rid, _ in results)
    # both workers served, each having opened its own PKCS#11 session after fork
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{")]
    request_pids = {x["pid"] for x in lines if x["msg"] == "request"}
    session_pids = {x["pid"] for x in lines if x["msg"] == "hsm session opened"}
    assert len(request_pids) == 2 and request_pids <= session_pids


def test_workers_copy_the_write_ahead_log_into_the_database_in_the_background(
    server: Server, setup: dict[str, Any], tmp_path: Path
) -> None:
    """No request checkpoints (kms.backends.storage.engine.make_engine); each worker's
    loop does, twice a second. So, soon after the traffic, the database file alone (copied
    without its -wal) holds every audit record the API shows."""
    records = len(_all_records(setup["admin"]))
    copy = tmp_path / "file-only.sqlite3"
    in_file = 0
    for _ in range(50):
        shutil.copyfile(server.data_dir / "kms.sqlite3", copy)
        # a copy taken in the middle of a checkpoint may be unreadable: take another
        with (
            contextlib.suppress(sqlite3.DatabaseError),
            contextlib.closing(sqlite3.connect(copy)) as db,
        ):
            in_file = db.execute("SELECT count(*) FROM audit_records").fetchone()[0]
        if in_file >= records:
            break
        time.sleep(0.1)
    assert in_file >= records


def test_database_and_logs_never_hold_a_dek_or_secret(
    server: Server, setup: dict[str, Any]
) -> None:
    deks = [unb64(dek) for _, _, dek in setup["results"] if dek]
    assert len(deks) == 150
    secrets = [
        setup["svc_token"],
        server.admin_token,
        (server.data_dir / "hsm.pin").read_text().strip(),
    ]
    files = [
        p
        for p in server.data_dir.iterdir()
        if p.is_file() and p.name.startswith(("kms.sqlite3", "server-"))
    ]
    assert any(p.name == "kms.sqlite3" for p in files)
    blob = b"".join(p.read_bytes() for p in files)
    for dek in deks:
        for form in (dek, b64(dek).encode(), dek.hex().encode(), b64(dek)[:20].encode()):
            assert form not in blob
    for secret in secrets:
        assert str(secret).encode() not in blob


def _copy_db(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def test_copy_of_database_without_the_hsm_token_decrypts_nothing(
    server: Server, setup: dict[str, Any], fresh_data_dir: Path
) -> None:
    svc = KmsClient(server.url, str(setup["svc_token"]))
    blob = svc.datakey("patients", {"t": "1"})
    assert blob.plaintext is not None
    copy = fresh_data_dir / "stolen.sqlite3"
    _copy_db(server.data_dir / "kms.sqlite3", copy)
    data = copy.read_bytes()
    # 1. No 32-byte window of the database opens the blob as an AES-256-GCM key.
    parsed = blobfmt.parse(blob.ciphertext)
    aad = parsed.aad({"t": "1"})
    for i in range(len(data) - 31):
        with contextlib.suppress(InvalidTag):
            AESGCM(data[i : i + 32]).decrypt(parsed.iv, parsed.ciphertext, aad)
            pytest.fail(f"bytes at offset {i} of the database decrypt the blob")
    assert blob.plaintext not in data
    # 2. The copy served by a KMS with another HSM token opens nothing: that HSM holds no
    # anchor of the copied chain (not ready, nothing audited runs) and no state anchor of
    # its sealed rows, so the stolen token does not even authenticate (authentication
    # follows the HSM state anchor: 503 state_refused), and its integrity key did not seal
    # the copied rows.
    with gunicorn_server(
        fresh_data_dir, workers=1, env={"KMS_DATABASE_URL": f"sqlite:///{copy}"}, ready=False
    ) as thief:
        ready = requests.get(thief.url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["audit_anchor"] == "audit_state_refused"
        stolen = KmsClient(thief.url, str(setup["svc_token"]))
        for attempt in (
            lambda: stolen.decrypt(blob.ciphertext, {"t": "1"}),
            lambda: stolen.datakey("patients"),
        ):
            with pytest.raises(KmsClientError) as err:
                attempt()
            assert (err.value.status, err.value.code) == (503, "state_refused")
        assert "holds no state anchor" in thief.log_text()


def test_sdk_envelope_files_through_the_server(
    server: Server, setup: dict[str, Any], tmp_path: Path
) -> None:
    svc = KmsClient(server.url, str(setup["svc_token"]))
    src, enc, out = tmp_path / "in.bin", tmp_path / "in.kms", tmp_path / "out.bin"
    src.write_bytes(b"patient record\n" * 20000)
    encrypt_file(svc, "patients", src, enc, context={"patient": "p-1"})
    assert b"patient record" not in enc.read_bytes()
    decrypt_file(svc, enc, out, context={"patient": "p-1"})
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(KmsClientError) as err:
        decrypt_file(svc, enc, tmp_path / "nope.bin", context={"patient": "p-2"})
    assert err.value.code == "decryption_failed" and not (tmp_path / "nope.bin").exists()


def test_token_unavailable_then_back_without_restart(fresh_data_dir: Path) -> None:
    with gunicorn_server(fresh_data_dir, workers=2) as srv:
        admin = KmsClient(srv.url, srv.admin_token)
        admin.create_key("k")
        tokens = fresh_data_dir / "tokens"
        shutil.move(tokens, fresh_data_dir / "tokens.away")
        try:
            for _ in range(4):  # reach both workers
                assert requests.get(srv.url + "/readyz", timeout=10).status_code == 503
            with pytest.raises(KmsClientError) as err:
                admin.create_key("k2")
            assert err.value.code == "hsm_unavailable" and err.value.status == 503
        finally:
            shutil.move(fresh_data_dir / "tokens.away", tokens)
        # a worker that found no state anchor while the token was away refuses sealed
        # rows until it looks again (every 2 s, kms/services/state_index.py): ready again
        # within seconds, on both workers, without a restart
        deadline, ready = time.monotonic() + 20, 0
        while ready < 6:
            status = requests.get(srv.url + "/readyz", timeout=10).status_code
            ready = ready + 1 if status == 200 else 0
            assert time.monotonic() < deadline, "not ready again"
            time.sleep(0.2 if status == 200 else 0.5)
        assert admin.create_key("k2")["alias"] == "k2"
        assert srv.proc.poll() is None


def test_a_worker_freezes_the_app_objects_out_of_the_garbage_collector(tmp_path: Path) -> None:
    """kms.wsgi (what each gunicorn worker loads) freezes what it built: a full collection
    then walks only what requests made since (see docs/performance.md)."""
    data = init_data_dir(tmp_path / "data")
    probe = (
        "import gc, kms.wsgi; "
        "print(gc.get_freeze_count(), sum(gc.get_count()), len(gc.get_objects()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "KMS_DATA_DIR": str(data)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    frozen, _young, tracked = (int(x) for x in done.stdout.split())
    assert frozen > 50_000 and tracked < frozen / 10

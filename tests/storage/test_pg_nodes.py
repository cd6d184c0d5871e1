"""Real gunicorn servers on PostgreSQL: two nodes (separate gunicorn masters sharing one
database and one SoftHSM token directory) appending at once leave one linear, verifiable
audit chain with exactly one record per request; and a PostgreSQL stop and restart under
a running server gives 503s, then 200s again without restarting the KMS."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from kms.client import KmsClient
from kms.formats import audit_record
from tests.helpers import Server, b64, gunicorn_server, run_kms
from tests.pg import PgCluster, PgDatabase

pytestmark = pytest.mark.e2e


def init(data_dir: Path, url: str) -> Path:
    done = run_kms("init", "--data-dir", str(data_dir), "--database-url", url, "--single-operator")
    assert done.returncode == 0, done.stderr
    return data_dir


def setup_service(server: Server) -> dict[str, str]:
    """A service principal with encrypt and decrypt on key ``k``; its auth header."""
    admin = KmsClient(server.url, server.admin_token)
    token = admin.create_principal("app", "service")["token"]
    admin.create_key("k")
    admin.grant("k", "app", ["encrypt", "decrypt"])
    return {"Authorization": f"Bearer {token}"}


def encrypt(server: Server, svc: dict[str, str], i: int) -> requests.Response:
    body = {"plaintext": b64(f"record {i}".encode()), "context": {"i": str(i)}}
    return requests.post(server.url + "/v1/keys/k/encrypt", json=body, headers=svc, timeout=30)


def export_and_verify(server: Server, tmp_path: Path) -> list[dict[str, Any]]:
    """Export through ``server`` and verify with ``kms audit verify``; the records."""
    bundle, report = server.export_and_verify(tmp_path)
    assert "VERIFIED" in report
    lines = [json.loads(x) for x in bundle.read_text().splitlines()]
    return [x for x in lines if x["type"] == "record"]


def assert_one_linear_chain(records: list[dict[str, Any]]) -> None:
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    prev = audit_record.GENESIS_HASH
    for r in records:
        assert r["prev_hash"] == prev, r["seq"]
        prev = r["hash"]


def test_two_nodes_appending_at_once_leave_one_linear_chain(
    pg_database: PgDatabase, tmp_path: Path
) -> None:
    data = init(tmp_path / "data", pg_database.url)
    with gunicorn_server(data, workers=2) as a, gunicorn_server(data, workers=2) as b:
        svc = setup_service(a)
        nodes = [a, b]
        with ThreadPoolExecutor(max_workers=8) as pool:
            encrypted = list(pool.map(lambda i: (i, encrypt(nodes[i % 2], svc, i)), range(200)))
        assert [r.status_code for _, r in encrypted] == [200] * 200
        # every blob one node made opens on the other
        decrypted = []
        for i, r in encrypted[:20]:
            body = {"ciphertext": r.json()["ciphertext"], "context": {"i": str(i)}}
            other = nodes[(i + 1) % 2]
            d = requests.post(other.url + "/v1/decrypt", json=body, headers=svc, timeout=30)
            assert d.status_code == 200 and d.json()["plaintext"] == b64(f"record {i}".encode())
            decrypted.append(d)
        a.kms("audit", "checkpoint")
        records = export_and_verify(b, tmp_path)
        logs = a.log_text() + b.log_text()
        served = [n.log_text().count('"path": "/v1/keys/k/encrypt"') for n in nodes]
    assert served == [100, 100]  # both nodes appended, at the same time
    assert_one_linear_chain(records)
    by_request: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_request.setdefault(record["request_id"], []).append(record)
    for response in [r for _, r in encrypted] + decrypted:
        found = by_request.get(response.headers["X-Request-Id"], [])
        assert len(found) == 1 and found[0]["outcome"] == "ok", found
    assert [r["operation"] for r in records].count("encrypt") == 200
    assert pg_database.cluster.password not in logs


def wait_for_workers(server: Server, workers: int, timeout: float = 30) -> None:
    """Until ``workers`` different worker processes have answered a request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests.get(server.url + "/healthz", timeout=10)
        pids = set(re.findall(r'"pid": (\d+), "request_id"', server.log_text()))
        if len(pids) >= workers:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {workers} workers answer:\n{server.log_text()[-2000:]}")


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    """A cluster of its own: this test stops it."""
    cluster = PgCluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_postgresql_stop_and_restart_gives_503s_then_recovers_without_a_kms_restart(
    own_cluster: PgCluster, tmp_path: Path
) -> None:
    own_cluster.create_database("kms")
    data = init(tmp_path / "data", own_cluster.url("kms"))
    with gunicorn_server(data, workers=2) as server:
        wait_for_workers(server, 2)  # stop the database under running workers, not booting ones
        svc = setup_service(server)
        ok = [encrypt(server, svc, i) for i in range(4)]
        assert [r.status_code for r in ok] == [200] * 4

        own_cluster.stop("fast")
        down = [encrypt(server, svc, i) for i in range(6)]  # both workers, pooled conns dead
        for r in down:
            assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        ready = requests.get(server.url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "storage_unavailable"

        own_cluster.start()
        back = [encrypt(server, svc, i) for i in range(6)]
        assert [r.status_code for r in back] == [200] * 6  # no restart of the KMS
        assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
        server.kms("audit", "checkpoint")  # the verifier needs a signature to cover the bundle
        records = export_and_verify(server, tmp_path)
        assert server.proc.poll() is None  # the same server all along
    assert_one_linear_chain(records)
    audited = {r["request_id"] for r in records}
    assert all(r.headers["X-Request-Id"] in audited for r in ok + back)
    assert not any(r.headers["X-Request-Id"] in audited for r in down)  # refused, unrecorded

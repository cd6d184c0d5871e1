"""/metrics through a real gunicorn with 2 workers: one scrape sums every worker."""

from __future__ import annotations

import json
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kms.client import KmsClient
from tests.helpers import Server, b64, gunicorn_server, init_data_dir

pytestmark = pytest.mark.e2e

N = 40  # successful encrypts
REFUSED = 6  # encrypts with a bad token


def _scrape(server: Server) -> tuple[str, dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    r = requests.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return r.text, out


def _encrypt_pids(server: Server) -> set[int]:
    """The worker processes that logged an answer to an encrypt."""
    log = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{")]
    return {
        x["pid"]
        for x in log
        if x["msg"] == "request" and x["path"] == "/v1/keys/metrics-key/encrypt"
    }


def _encrypt_requests(server: Server) -> tuple[tuple[str, str, str], int]:
    """Rounds of N encrypts and REFUSED with a bad token, 8 at a time, until both workers
    have served some (the kernel hands connections to whichever worker accepts first, so
    one round may land on one worker). Returns the secrets used and the number of rounds."""
    admin = KmsClient(server.url, server.admin_token)
    svc = admin.create_principal("metrics-app", "service")
    key_id = admin.create_key("metrics-key")["key_id"]
    admin.grant("metrics-key", "metrics-app", ["encrypt"])
    good = {"Authorization": f"Bearer {svc['token']}"}
    bad = {"Authorization": "Bearer wrong-token-not-valid-0123456789"}

    def encrypt(i: int) -> int:
        r = requests.post(
            f"{server.url}/v1/keys/metrics-key/encrypt",
            json={"plaintext": b64(f"record {i}".encode()), "context": {"record": str(i)}},
            headers=good if i < N else bad,
            timeout=30,
        )
        return r.status_code

    rounds = 0
    while rounds < 10 and (rounds == 0 or len(_encrypt_pids(server)) < 2):
        with ThreadPoolExecutor(max_workers=8) as pool:
            codes = list(pool.map(encrypt, range(N + REFUSED)))
        assert codes == [200] * N + [401] * REFUSED
        rounds += 1
    return (svc["token"], key_id, server.admin_token), rounds


def test_one_scrape_counts_the_requests_of_every_worker(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    metrics_dir = tmp_path / "metrics"
    env = {"KMS_METRICS_DIR": str(metrics_dir)}
    with gunicorn_server(data, workers=2, env=env) as server:
        secrets, rounds = _encrypt_requests(server)
        ok, refused = N * rounds, REFUSED * rounds
        # several scrapes, served by whichever worker: each shows the server's totals
        for _ in range(6):
            text, m = _scrape(server)
            assert m["kms_requests_total"][(("operation", "encrypt"), ("outcome", "ok"))] == ok
            assert (
                m["kms_requests_total"][(("operation", "encrypt"), ("outcome", "unauthenticated"))]
                == refused
            )
            assert m["kms_request_seconds_count"][(("operation", "encrypt"),)] == ok + refused
            every = m["kms_request_seconds_bucket"][(("le", "+Inf"), ("operation", "encrypt"))]
            assert every == ok + refused
            assert m["kms_audit_append_seconds_count"][()] >= ok
            assert m["kms_rotation_due_keys"][()] == 0
            assert "kms_hsm_errors_total" not in m or sum(m["kms_hsm_errors_total"].values()) == 0
            for secret in (*secrets, "metrics-key", "metrics-app", "wrong-token"):
                assert secret not in text
        pids = _encrypt_pids(server)
    assert len(pids) == 2  # both workers served encrypts, yet every scrape saw all N
    assert stat.S_IMODE(metrics_dir.stat().st_mode) == 0o700
    files = {p.name for p in metrics_dir.iterdir()}
    assert {f"counter_{pid}.db" for pid in pids} <= files  # each worker wrote its own file

    # a restart wipes the directory: counts start again from zero
    with gunicorn_server(data, workers=2, env=env) as server:
        _, m = _scrape(server)
    ok = m.get("kms_requests_total", {}).get((("operation", "encrypt"), ("outcome", "ok")), 0)
    assert ok == 0
    assert not {f"counter_{pid}.db" for pid in pids} & {p.name for p in metrics_dir.iterdir()}


def test_default_metrics_directory_is_private_and_removed_at_exit(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with gunicorn_server(data, workers=2, env={"TMPDIR": str(tmp)}) as server:
        _scrape(server)
        (made,) = tmp.glob("kms-metrics-*")
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
        assert any(p.name.endswith(".db") for p in made.iterdir())
    assert not made.exists()

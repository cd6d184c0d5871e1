"""Slow clients against a live gunicorn (2 sync workers, KMS_WORKER_TIMEOUT=3).

A sync worker is held by one connection until its request is read and answered. A client
that dribbles its headers or body holds one worker; the master's worker timeout frees it
(the connection is closed without an answer and a new worker takes its place), and the
other worker serves everyone else meanwhile. The default timeout stays 30 s
(deploy/gunicorn.conf.py); the test shortens it through the environment.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from kms.client import KmsClient
from tests.helpers import Server, free_port, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e

TIMEOUT = 3  # seconds, KMS_WORKER_TIMEOUT for this test
DRIBBLE_FOR = 30.0  # the slow client would go on this long if nobody stopped it


class SlowClient(threading.Thread):
    """Sends ``head`` and then one byte every 0.2 s; notes how the connection ended."""

    def __init__(self, port: int, head: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.head = port, head
        self.answer = b""
        self.ended_by_server = False
        self.seconds = 0.0

    def run(self) -> None:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(self.head)
            while time.monotonic() - start < DRIBBLE_FOR:
                try:
                    if select.select([s], [], [], 0.2)[0]:
                        data = s.recv(4096)
                        self.answer += data
                        if not data:
                            self.ended_by_server = True
                            break
                    s.sendall(b"x")
                except OSError:  # reset or broken pipe: closed by the server
                    self.ended_by_server = True
                    break
        self.seconds = time.monotonic() - start


def _replacement_pid(srv: Server) -> int:
    """The pid of the third worker the master booted (after the first two)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        booted = re.findall(r"Booting worker with pid: (\d+)", srv.log_text())
        if len(booted) >= 3:
            return int(booted[2])
        time.sleep(0.1)
    raise AssertionError("the aborted worker was not replaced")


@pytest.mark.parametrize("stage", ["body", "headers"])
def test_slow_client_is_cut_off_by_the_timeout_and_others_are_served(
    fresh_data_dir: Path, stage: str
) -> None:
    with gunicorn_server(
        fresh_data_dir, workers=2, env={"KMS_WORKER_TIMEOUT": str(TIMEOUT)}
    ) as srv:
        admin = KmsClient(srv.url, srv.admin_token)
        svc = admin.create_principal("app", "service")
        admin.create_key("k")
        admin.grant("k", "app", ["datakey"])
        app = {"Authorization": f"Bearer {svc['token']}"}

        def datakey(_: object = None) -> int:
            url = srv.url + "/v1/keys/k/datakey"
            return requests.post(url, json={}, headers=app, timeout=10).status_code

        head = (
            f"POST /v1/keys/k/datakey HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: Bearer {svc['token']}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n"
        ).encode()
        if stage == "headers":
            head = head[: head.index(b"Content-Type")]  # the rest never comes
        slow = SlowClient(int(srv.url.rsplit(":", 1)[1]), head)
        slow.start()
        served = []
        while slow.is_alive():  # everyone else, while the slow client holds a worker
            served.append(datakey())
        slow.join()
        assert slow.ended_by_server and slow.seconds < DRIBBLE_FOR  # freed by the timeout
        assert slow.answer == b""  # closed without an answer: no 500, no half response
        assert len(served) > 10 and set(served) == {200}
        replacement = _replacement_pid(srv)
        deadline = time.monotonic() + 30  # the replacement boots, then serves too
        with ThreadPoolExecutor(max_workers=4) as pool:
            while f'"pid": {replacement}, "request_id"' not in srv.log_text():
                assert time.monotonic() < deadline, f"worker {replacement} served nothing"
                assert set(pool.map(datakey, range(8))) == {200}
        log = srv.log_text()
    assert "WORKER TIMEOUT" in log
    assert f"worker timeout ({TIMEOUT} s): closed" in log and "without an answer" in log
    assert "Traceback" not in log and "Internal Server Error" not in log


def test_default_timeout_is_30_seconds_and_a_bad_override_is_refused(fresh_data_dir: Path) -> None:
    conf = Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py"
    namespace: dict[str, object] = {}
    exec(compile(conf.read_text(), str(conf), "exec"), namespace)  # noqa: S102
    assert namespace["timeout"] == 30
    assert namespace["worker_class"] == "kms.gunicorn_worker.KmsSyncWorker"
    for bad in ("0", "abc", "601"):
        done = run_kms(
            "serve",
            "--data-dir",
            str(fresh_data_dir),
            "--bind",
            f"127.0.0.1:{free_port()}",
            env={"KMS_WORKER_TIMEOUT": bad},
        )
        assert done.returncode != 0
        assert "KMS_WORKER_TIMEOUT must be a whole number of seconds" in done.stdout + done.stderr

"""A real ``redis-server`` (Debian's package) for the tests: on a free loopback port, in
its own directory, without persistence unless a test asks to keep the data across a
restart. Tests stop and start it again on the same port to make Redis fail."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import redis

from kms.backends.redis_store import NONCE_EPOCH
from tests.helpers import free_port


class RedisServer:
    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (make system-deps)")
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start (again) on the same port; loads dump.rdb if ``stop(keep_data=True)``
        wrote one. Returns once it answers PING."""
        assert self.proc is None, "already running"
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 (the server's stdout)
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.dir)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((self.dir / "redis.log").read_text()[-2000:]) from None
                time.sleep(0.05)

    def stop(self, keep_data: bool = False) -> None:
        """Stop the server: its data is lost, unless ``keep_data`` (SHUTDOWN SAVE, as a
        Redis with persistence would keep it)."""
        if self.proc is None:
            return
        if keep_data:
            with contextlib.suppress(redis.ConnectionError):  # it closes the connection
                self.client().shutdown(save=True)
        else:
            (self.dir / "dump.rdb").unlink(missing_ok=True)
            self.proc.terminate()
        self.proc.wait(timeout=15)
        self.proc = None

    def flush(self) -> None:
        """An empty data set whose replay store has been running for long (no warm-up)."""
        client = self.client()
        client.flushall()
        client.set(NONCE_EPOCH, 0)

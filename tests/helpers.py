"""Shared test helpers: running the CLI, starting a real gunicorn server, API shortcuts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy

ROOT = Path(__file__).resolve().parents[1]


def post_decrypt(url: str, token: str, blob: bytes) -> requests.Response:
    """POST /v1/decrypt of ``blob`` (context patient=p-1) to the server at ``url``."""
    return requests.post(
        url + "/v1/decrypt",
        json={"ciphertext": b64(blob), "context": {"patient": "p-1"}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def seal_failures(url: str, kind: str) -> float:
    """The server's kms_seal_failures_total for ``kind`` (0 before the first)."""
    text = requests.get(url + "/metrics", timeout=10).text
    found = re.search(rf'kms_seal_failures_total{{kind="{kind}"}} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def run_kms(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``kms`` command in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "kms", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


def init_data_dir(path: Path) -> Path:
    """A data directory in single-operator mode: the tests of everything but dual control
    (tests/functional/test_dual_control*.py make their own, in dual mode)."""
    done = run_kms("init", "--data-dir", str(path), "--single-operator")
    assert done.returncode == 0, done.stderr
    return path


@contextmanager
def anchored(storage: Any, hsm: Any) -> Iterator[str]:
    """Anchor ``storage``'s audit chain and sealed state in ``hsm`` as ``kms init`` does
    (the token may anchor other tests' chains), and destroy the anchors afterwards."""
    from kms.services import state_index
    from kms.services.audit import AuditTrail
    from kms.services.audit_anchor import AuditAnchor
    from kms.services.clock import SystemClock

    chain_id = AuditTrail(storage, SystemClock(), hsm).anchor_new_chain(allow_other_chains=True)
    assert chain_id is not None
    state_index.StateIndex(hsm, storage).anchor(chain_id)
    try:
        yield chain_id
    finally:
        for label in (AuditAnchor.label(chain_id), state_index.label(chain_id)):
            for value in hsm.anchor_values(label):
                hsm.drop_anchor(label, value)


_UPDATE_KEYS = """
from dataclasses import replace
from datetime import datetime
from kms import config
from kms.app import hsm_config
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage, make_engine
from kms.services.seals import RowSeals
settings = config.from_env({{"KMS_DATA_DIR": {data_dir!r}}})
hsm = Pkcs11Hsm(hsm_config(settings))
storage = SqlStorage(make_engine(settings.database_url), RowSeals(hsm))
changes = {{k: datetime.fromisoformat(v) for k, v in {changes!r}.items()}}
with storage.transaction() as tx:
    for key in tx.list_keys():
        if {key_id!r} in (None, key.key_id):
            tx.update_key(replace(key, **changes))
hsm.close()
"""


def update_keys(data_dir: Path, key_id: str | None = None, **changes: datetime) -> None:
    """Test set-up that only time would do (a version made days ago, a deletion date that
    has passed): change the times of one key (or all) and seal the rows as the server
    would, from a fresh process (a process holds one SoftHSM configuration)."""
    code = _UPDATE_KEYS.format(
        data_dir=str(data_dir),
        key_id=key_id,
        changes={k: v.isoformat() for k, v in changes.items()},
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def admin_env(self) -> dict[str, str]:
        """The environment that points the ``kms`` CLI at this server as its admin."""
        return {"KMS_URL": self.url, "KMS_TOKEN_FILE": str(self.data_dir / "admin.token")}

    def kms(self, *args: str) -> str:
        """Run the ``kms`` CLI as this server's admin; its standard output (it must succeed)."""
        done = run_kms(*args, env=self.admin_env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def export_and_verify(self, tmp_path: Path) -> tuple[Path, str]:
        """Export the audit bundle and public key with the CLI, verify them offline with
        ``kms audit verify`` (it must succeed); the bundle's path and the report."""
        bundle, pem = tmp_path / "all.jsonl", tmp_path / "audit.pem"
        self.kms("audit", "export", "--out", str(bundle))
        self.kms("audit", "public-key", "--out", str(pem))
        done = run_kms("audit", "verify", str(bundle), "--public-key", str(pem))
        assert done.returncode == 0, done.stdout + done.stderr
        return bundle, done.stdout

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def gunicorn_server(
    data_dir: Path,
    workers: int = 2,
    env: dict[str, str] | None = None,
    tls: dict[str, Any] | None = None,
    ready: bool = True,
    wrap: Callable[..., list[str]] | None = None,
) -> Iterator[Server]:
    """``kms serve`` on a free loopback port; stopped (SIGTERM, then SIGKILL) on exit.
    With ``tls`` (the requests arguments the readiness probe needs: ``verify``, ``cert``)
    the server is reached as https://localhost (KMS_TLS_* go in ``env``). With ``ready``
    False, waiting ends when the server is live (/healthz) even if it is not ready.
    ``wrap`` turns the command's argv into the one run (e.g. tests.nss_token's
    ``NssToken.command``: it must exec the command, not fork it)."""
    port = free_port()
    log_path = data_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        argv = [
            sys.executable,
            "-m",
            "kms",
            "serve",
            "--data-dir",
            str(data_dir),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
        ]
        proc = subprocess.Popen(
            wrap(*argv) if wrap is not None else argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    url = f"https://localhost:{port}" if tls is not None else f"http://127.0.0.1:{port}"
    server = Server(url, data_dir, proc, log_path)
    try:
        wait_ready(server, path="/readyz" if ready else "/healthz", **(tls or {}))
        if ready and (env or {}).get("KMS_LOG_LEVEL", "INFO") in ("INFO", "DEBUG"):
            wait_indexed(server, workers)  # (the line it waits for is logged at INFO)
        yield server
    except BaseException:  # the server's own account of the failure, in pytest's output
        levels = ('"level": "ERROR"', '"level": "WARNING"')
        noted = [x for x in server.log_text().splitlines() if any(v in x for v in levels)]
        print("server errors and warnings (last 30):", *noted[-30:], sep="\n")
        raise
    finally:
        stop(proc)


def wait_ready(server: Server, timeout: float = 30.0, path: str = "/readyz", **probe: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log_text()[-3000:]}")
        try:
            if requests.get(server.url + path, timeout=1, **probe).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready:\n{server.log_text()[-3000:]}")


def wait_indexed(server: Server, workers: int, timeout: float = 30.0) -> None:
    """Wait until every worker logged that its index of sealed rows is built (a worker
    that first indexes a database an attack already edited refuses every sealed row,
    kms/services/state_index.py: tests that edit the database start once all indexed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {
            json.loads(line).get("pid")
            for line in server.log_text().splitlines()
            if '"sealed state indexed"' in line
        }
        if len(pids) >= workers:
            return
        time.sleep(0.05)
    raise RuntimeError(f"workers did not index the sealed state:\n{server.log_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class ManualClock:
    """A clock the test moves (the services' Clock port), for waiting periods."""

    def __init__(self) -> None:
        self.now_ = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.now_

    def advance(self, seconds: float) -> None:
        self.now_ += timedelta(seconds=seconds)


class Api:
    """Flask test-client shortcuts for functional tests."""

    def __init__(self, client: Any, admin_token: str) -> None:
        self.client = client
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self._n = 0

    def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> Any:
        return self.client.open(path, method=method, headers=headers, **kwargs)

    def principal(self, role: str, name: str | None = None) -> dict[str, str]:
        self._n += 1
        r = self.call(
            "POST",
            "/v1/principals",
            self.admin,
            json={"name": name or f"{role}-{self._n}", "role": role},
        )
        assert r.status_code == 201, r.json
        return {"Authorization": f"Bearer {r.json['token']}", "X-Name": r.json["name"]}

    def key(
        self,
        alias: str | None = None,
        grant: dict[str, str] | None = None,
        ops: tuple[str, ...] = ("datakey", "encrypt", "decrypt", "rewrap"),
    ) -> str:
        body = {"alias": alias} if alias else {}
        r = self.call("POST", "/v1/keys", self.admin, json=body)
        assert r.status_code == 201, r.json
        key_id = str(r.json["key_id"])
        if grant is not None:
            g = self.call(
                "POST",
                f"/v1/keys/{key_id}/grants",
                self.admin,
                json={"principal": grant["X-Name"], "operations": list(ops)},
            )
            assert g.status_code == 200, g.json
        return key_id

    def audit(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            after = out[-1]["seq"] if out else 0
            r = self.call("GET", f"/v1/audit?after={after}&limit=1000", self.admin)
            assert r.status_code == 200, r.json
            if not r.json["records"]:
                return out
            out.extend(r.json["records"])


SECRET = b"data-owner-shared-webhook-secret"


class Receiver:
    """The data owner's endpoint: refuses the first ``fail_first`` deliveries (of
    ``fail_event`` only, if given) with 503, and any with a bad signature; acknowledges
    the others with 200 and ``X-KMS-Ack`` (``ack``: "valid", or "none" and "wrong" for a
    receiver that answers 200 without proving it holds the secret)."""

    def __init__(
        self, fail_first: int = 0, fail_event: str | None = None, ack: str = "valid"
    ) -> None:
        self.fail_first = fail_first
        self.fail_event = fail_event
        self.ack = ack
        self.attempts: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers["X-KMS-Timestamp"]
                expected = (
                    "v1=" + hmac.new(SECRET, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                )
                valid = hmac.compare_digest(expected, self.headers["X-KMS-Signature"])
                entry = {
                    "valid": valid,
                    "event": self.headers["X-KMS-Event"],
                    "body": json.loads(body),
                    "at": time.monotonic(),
                }
                receiver.attempts.append(entry)
                watched = [
                    a for a in receiver.attempts if receiver.fail_event in (None, a["event"])
                ]
                failing = entry in watched and len(watched) <= receiver.fail_first
                ok = valid and not failing
                if ok:
                    receiver.accepted.append(entry)
                self.send_response(200 if ok else 503)
                if ok and receiver.ack != "none":
                    key = SECRET if receiver.ack == "valid" else b"not-the-shared-secret"
                    ack = hmac.new(key, b"ack." + ts.encode() + b"." + body, hashlib.sha256)
                    self.send_header("X-KMS-Ack", "v1=" + ack.hexdigest())
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/kms-events"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def wait_for(self, event: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.accepted:
                if entry["event"] == event:
                    return entry
            time.sleep(0.1)
        raise AssertionError(f"{event} not delivered; attempts: {self.attempts}")


@contextmanager
def immutable(paths: list[Path]) -> Iterator[None]:
    """Make files immutable (``chattr +i``): every write to them fails with EPERM, for root
    too and through descriptors already open for writing (ext4, xfs, btrfs), as on a
    filesystem that went read-only under the server. Always undone on exit. Skips the test
    where the filesystem or the process cannot set the flag."""
    probe = paths[0].with_name("chattr-probe")
    probe.touch()
    supported = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
    subprocess.run(["chattr", "-i", str(probe)], capture_output=True, check=False)
    probe.unlink()
    if supported.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {supported.stderr.strip()}")
    try:
        subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True, check=False)


# the columns of audit_records at schema 0001 (v came with a later revision)
INSERT_AUDIT_AT_0001 = sqlalchemy.text(
    "INSERT INTO audit_records (seq, time, request_id, principal, operation, key_id, "
    "key_version, context_sha256, justification, case_id, outcome, detail, prev_hash, hash) "
    "VALUES (:seq, :time, :request_id, :principal, :operation, :key_id, :key_version, "
    ":context_sha256, :justification, :case_id, :outcome, :detail, :prev_hash, :hash)"
)


def write_audit_chain_at_0001(conn: Any, count: int = 3) -> list[dict[str, Any]]:
    """Insert a valid chain of ``count`` audit records with the columns of schema 0001
    (raw SQL, as a first-release database has them) and point the head at it."""
    from kms.formats import audit_record

    records, prev = [], audit_record.GENESIS_HASH
    for seq in range(1, count + 1):
        rec: dict[str, Any] = {
            "v": 1,
            "seq": seq,
            "time": f"2026-01-01T00:00:0{seq}.000Z",
            "request_id": f"r{seq}",
            "principal": "svc",
            "operation": "decrypt",
            "key_id": "k1",
            "key_version": 1,
            "context_sha256": None,
            "justification": "service_processing",
            "case_id": None,
            "outcome": "ok",
            "detail": None,
            "prev_hash": prev,
        }
        rec["hash"] = prev = audit_record.record_hash(rec)
        records.append(rec)
        conn.execute(INSERT_AUDIT_AT_0001, {k: v for k, v in rec.items() if k != "v"})
    conn.execute(
        sqlalchemy.text("UPDATE audit_head SET seq = :seq, hash = :hash"),
        {"seq": count, "hash": prev},
    )
    return records


def assert_audit_chain_kept(conn: Any, chain: list[dict[str, Any]]) -> None:
    """The records write_audit_chain_at_0001 wrote are unchanged by every later revision
    (0007 copies the table on SQLite) and still verify as a chain."""
    from kms.formats import audit_record

    query = sqlalchemy.text("SELECT * FROM audit_records ORDER BY seq")
    rows = [r._asdict() for r in conn.execute(query)]
    assert rows == chain
    assert audit_record.verify_chain(rows) == chain[-1]["hash"]


# Rows holding a wrapped KEK as a schema-0012 server wrote them (raw SQL, its columns:
# no wrap_mechanism yet), with placeholder seals: what migration 0013 must fill in.
_KEK_ROWS_AT_0012 = (
    "INSERT INTO keys (key_id, description, state, current_version, created_at,"
    " min_decryption_version) VALUES ('k12', '', 'enabled', 1, '2026-01-01 00:00:00Z', 1)",
    "INSERT INTO key_versions (key_id, version, wrapped_kek, root_label, created_at, seal)"
    " VALUES ('k12', 1, :w, 'kms-root', '2026-01-01 00:00:00Z', :seal)",
    "INSERT INTO principals (id, name, role, created_at)"
    " VALUES (120, 'aws-12', 'service', '2026-01-01 00:00:00Z')",
    "INSERT INTO sigv4_credentials (access_key_id, principal_id, sealed_secret, wrapped_kek,"
    " root_label, state, created_at, seal) VALUES ('AKID0012EXAMPLE', 120, :s, :w, 'kms-root',"
    " 'active', '2026-01-01T00:00:00.000Z', :seal)",
)


def write_kek_rows_at_0012(conn: Any) -> None:
    """A key version row and a SigV4 credential row written at schema 0012."""
    params = {"w": b"\x02wrapped", "s": b"\x01sealed", "seal": "0" * 64}
    for statement in _KEK_ROWS_AT_0012:
        conn.execute(sqlalchemy.text(statement), params)


def check_0013_on(engine: Any) -> None:
    """Migrate ``engine`` (an empty database) to 0012, write KEK rows as that schema did,
    upgrade to 0013 and check the rows record the legacy wrap mechanism."""
    from kms.backends.storage import upgrade

    upgrade(engine, target="0012")
    with engine.begin() as conn:
        write_kek_rows_at_0012(conn)
    upgrade(engine, target="0013")
    with engine.connect() as conn:
        assert_kek_rows_legacy(conn)
        version = conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version"))
        assert version.scalar() == "0013"
    engine.dispose()


def assert_kek_rows_legacy(conn: Any) -> None:
    """After 0013 the rows of write_kek_rows_at_0012 are kept and record the mechanism
    every KEK was wrapped with until then."""
    versions = conn.execute(
        sqlalchemy.text("SELECT key_id, version, wrapped_kek, wrap_mechanism FROM key_versions")
    ).all()
    assert [tuple(r) for r in versions if r[0] == "k12"] == [
        ("k12", 1, b"\x02wrapped", "CKM_AES_KEY_WRAP_PAD")
    ]
    credentials = conn.execute(
        sqlalchemy.text("SELECT access_key_id, wrapped_kek, wrap_mechanism FROM sigv4_credentials")
    ).all()
    assert [tuple(r) for r in credentials] == [
        ("AKID0012EXAMPLE", b"\x02wrapped", "CKM_AES_KEY_WRAP_PAD")
    ]


_EXTRA_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
"""


def extra_revision(tmp_path: Path) -> Path:
    """A versions folder holding revision 9001 (adds ``keys.owner``) on top of the newest
    real revision, as a later release would ship it."""
    from alembic.script import ScriptDirectory

    from kms.backends.storage import migrate

    versions = tmp_path / "versions"
    versions.mkdir()
    head = ScriptDirectory.from_config(migrate._config()).get_current_head()
    (versions / "9001_owner.py").write_text(_EXTRA_REVISION.replace("{head}", str(head)))
    return versions


def write_pem(cert: Any, cert_path: Path, key: Any, key_path: Path) -> None:
    """Write an x509 certificate and its private key (PKCS#8, unencrypted, mode 0600) as PEM."""
    from cryptography.hazmat.primitives import serialization

    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


class FailingPkcs11:
    """Stands in for a PKCS#11 session or key object of a real token (a fault injected, as
    by a device that fails): every method call raises a PKCS#11 device error."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        def fail(*_a: Any, **_k: Any) -> Any:
            from pkcs11 import exceptions

            raise exceptions.DeviceError()

        return fail

"""Measuring tools shared by the benchmark scripts: wrk with a Lua script that reports
percentiles, an open-loop generator, raw SoftHSM rates, bulk key seeding."""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.helpers import ROOT, free_port, stop

# Benchmarks measure, never throttle: the audit budget (KMS_AUDIT_BUDGET) and the rate
# limit (KMS_RATE_LIMITS, which counts batch items) out of the way.
UNTHROTTLED_BUDGET = "service=none"

WRK_SCRIPT = """
local bodies = {}
local n = 0
for line in io.lines("%(bodies)s") do n = n + 1; bodies[n] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  i = (i %% n) + 1
  return wrk.format(nil, "%(path)s", nil, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.timeout))
end
"""


def run_wrk(
    url: str, path: str, token: str, bodies: list[str], seconds: float, conns: int, work: Path
) -> dict[str, Any]:
    """Closed-loop load with wrk (1 thread, ``conns`` connections) cycling over ``bodies``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "bodies.txt").write_text("\n".join(bodies) + "\n")
    (work / "post.lua").write_text(
        WRK_SCRIPT % {"bodies": work / "bodies.txt", "token": token, "path": path}
    )
    done = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, int(seconds))}s",
            "-s",
            str(work / "post.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    )
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", done.stdout)
    assert m, done.stdout + done.stderr
    requests, duration_us, p50, p99, p999, errors = map(int, m.groups())
    return {
        "rps": requests / (duration_us / 1e6),
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "p999_ms": p999 / 1000,
        "errors": errors,
    }


def open_loop(
    url: str, token: str, bodies: list[str], rate: float, seconds: float
) -> dict[str, Any]:
    """Send at a fixed ``rate`` whatever the answers take (no coordinated omission): each
    latency runs from the request's scheduled time. Threads on one keep-alive-less client."""
    parts = urlsplit(url)
    total = int(rate * seconds)
    start = time.perf_counter() + 0.2
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    threads = 16

    def worker(k: int) -> None:
        for i in range(k, total, threads):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            try:
                conn.request(
                    "POST",
                    parts.path,
                    body=bodies[i % len(bodies)],
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                    },
                )
                ok = conn.getresponse().status == 200
            except OSError:
                ok = False
            finally:
                conn.close()
            with lock:
                latencies.append(time.perf_counter() - due)
                errors[0] += not ok

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    latencies.sort()
    return {
        "target_rps": rate,
        "achieved_rps": len(latencies) / seconds,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "p999_ms": percentile_ms(latencies, 99.9),
        "errors": errors[0],
    }


def percentile_ms(latencies: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted latencies in seconds, in milliseconds."""
    return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000


@contextmanager
def bare_flask_server(
    app: str = "bare_app:app", env: dict[str, str] | None = None
) -> Iterator[str]:
    """``app`` (a module of bench/, default the ceiling's bench/bare_app.py) under gunicorn
    with the KMS's gunicorn.conf.py and 2 workers, with ``env`` added to the environment."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(ROOT / "deploy" / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--chdir",
            str(ROOT / "bench"),
            app,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        for _ in range(100):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def floor_rates(data_dir: Path, seconds: float, work: Path) -> dict[str, Any]:
    """bench/floor_app.py's single decrypt and 1000-item batch decrypt under wrk, as the
    KMS's are measured (8 and 2 connections)."""
    import hashlib
    import secrets

    ctx = multiprocessing.get_context("fork")  # PKCS#11 only ever in the child
    queue = ctx.Queue()
    db = work / "floor.sqlite3"
    contexts = [{"row": str(i)} for i in range(200)]
    proc = ctx.Process(target=_prepare_floor, args=(str(data_dir), str(db), contexts, queue))
    proc.start()
    bodies = queue.get(timeout=120)
    proc.join()
    token = secrets.token_urlsafe(32)
    env = {
        "FLOOR_DATA_DIR": str(data_dir),
        "FLOOR_DB": str(db),
        "FLOOR_TOKEN_SHA256": hashlib.sha256(token.encode()).hexdigest(),
    }
    batch = json.dumps({"items": [json.loads(bodies[i % len(bodies)]) for i in range(1000)]})
    with bare_flask_server("floor_app:app", env) as url:
        single = run_wrk(url, "/v1/decrypt", token, bodies, seconds, 8, work / "floor")
        many = run_wrk(url, "/v1/decrypt", token, [batch], seconds, 2, work / "floor-batch")
    return {"decrypt": single, "batch decrypt 1000": {**many, "items_per_s": many["rps"] * 1000}}


def _prepare_floor(data_dir: str, db: str, contexts: list[dict[str, str]], out: Any) -> None:
    from bench.floor_app import prepare

    out.put(prepare(data_dir, db, contexts))


def _raw_worker(data_dir: str, seconds: float, op: str, out: Any) -> None:
    import pkcs11
    from pkcs11 import GCMParams, KeyType, Mechanism, ObjectClass

    from bench.floor_app import unwrap_kek
    from hsm_config import templates
    from kms import config

    settings = config.from_env({"KMS_DATA_DIR": data_dir})
    os.environ["SOFTHSM2_CONF"] = settings.softhsm2_conf or ""
    lib = pkcs11.lib(settings.pkcs11_module)
    for attempt in range(10):
        try:
            session = lib.get_token(token_label=settings.token_label).open(user_pin=settings.pin)
            break
        except pkcs11.exceptions.PKCS11Error:
            lib.finalize()
            lib.initialize()
            time.sleep(0.05 * (attempt + 1))
    root = session.get_key(object_class=ObjectClass.SECRET_KEY, label=settings.root_key_label)
    tmp = session.generate_key(KeyType.AES, 256, store=False, template=templates.KEK_TO_WRAP)
    wrapped = root.wrap_key(tmp, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    kek = unwrap_kek(root, wrapped)
    aad, dek, iv = b"a" * 60, os.urandom(32), os.urandom(12)
    ct = kek.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad))
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            if op == "encrypt":
                kek.encrypt(
                    dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(os.urandom(12), aad)
                )
            else:
                kek.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad))
        count += 100
    out.put(count / seconds)


def raw_hsm_rate(data_dir: Path, procs: int, seconds: float, op: str) -> float:
    """AES-256-GCM ``op``/s through python-pkcs11 on a cached session KEK, summed over
    ``procs`` processes (each forked before touching PKCS#11)."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [
        ctx.Process(target=_raw_worker, args=(str(data_dir), seconds, op, queue))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    rates = [queue.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join()
    return float(sum(rates))


def seed_keys(data_dir: Path, total: int, used: int) -> tuple[str, list[bytes]]:
    """``total`` keys (KEKs made and wrapped by the HSM, rows written in bulk, then sealed), one
    service granted on all; returns its token and one blob for each of ``used`` random keys.
    Runs in a child process so this one never initialises PKCS#11."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_seed, args=(data_dir, total, used, queue))
    proc.start()
    token, blobs = queue.get(timeout=600)
    proc.join()
    return token, [base64.b64decode(b) for b in blobs]


def _seed(data_dir: Path, total: int, used: int, out: Any) -> None:
    import random
    import uuid
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from kms import config
    from kms.app import build_services, hsm_config, options_from_settings
    from kms.backends.hsm import Pkcs11Hsm
    from kms.backends.storage import SqlStorage, make_engine
    from kms.backends.storage import schema as t
    from kms.services.audit_events import Caller
    from kms.services.crypto import DataKeyRequest

    settings = config.from_env({"KMS_DATA_DIR": str(data_dir)})
    engine = make_engine(settings.database_url, "NORMAL")
    hsm = Pkcs11Hsm(hsm_config(settings))
    storage = SqlStorage(engine)
    services = build_services(storage, hsm, options=options_from_settings(settings))
    admin = services.principals.authenticate((data_dir / "admin.token").read_text().strip())
    principal, token = services.principals.create(Caller("seed", admin), "bench-many", "service")
    now = datetime.now(UTC)
    ids = [str(uuid.uuid4()) for _ in range(total)]
    wrapped = [hsm.new_wrapped_kek() for _ in range(total)]
    with engine.begin() as conn:
        conn.execute(
            insert(t.keys),
            [
                {
                    "key_id": k,
                    "description": "",
                    "state": "enabled",
                    "current_version": 1,
                    "created_at": now,
                }
                for k in ids
            ],
        )
        conn.execute(
            insert(t.key_versions),
            [
                {
                    "key_id": k,
                    "version": 1,
                    "wrapped_kek": w.wrapped,
                    "root_label": w.root_label,
                    "created_at": now,
                }
                for k, w in zip(ids, wrapped, strict=True)
            ],
        )
        conn.execute(
            insert(t.grants),
            [
                {
                    "key_id": k,
                    "principal_id": principal.id,
                    "operations": "datakey,decrypt",
                    "justifications": "service_processing",
                }
                for k in ids
            ],
        )
    with storage.reader() as tx:
        chain_id = tx.audit_chain_id()
    assert chain_id is not None
    # the rows written in bulk above are taken as found, as `kms migrate` takes a
    # database's, then sealed by the HSM (a logged change of the anchored state)
    services.state.anchor(chain_id)
    with storage.transaction() as tx:
        tx.seal_unsealed()
    caller = Caller("seed", principal)
    blobs = []
    for key_id in random.sample(ids, used):
        (sealed,) = services.crypto.datakey(caller, key_id, [DataKeyRequest({})])
        blobs.append(base64.b64encode(sealed.ciphertext).decode())  # type: ignore[union-attr]
    hsm.close()
    engine.dispose()
    out.put((token, blobs))

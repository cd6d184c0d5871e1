"""The floor: the least work a single decrypt can do on this stack (Flask under the KMS's
gunicorn settings, SoftHSM through python-pkcs11, SQLite in WAL mode) while still
answering only after a hash-chained audit record is durable. bench/run.py measures it
beside the ceiling and the KMS.

Per request it does what the design (docs/design.md) cannot do without: look the bearer
token up by its SHA-256, parse the JSON body and base64, one AES-256-GCM decrypt in the HSM
with the context as AAD (session and unwrapped KEK cached per worker, made after fork),
encode the record canonically and chain it (SHA-256 over the predecessor's hash), and
append it to a table with the KMS's audit schema and indexes in its own ``BEGIN
IMMEDIATE`` ... ``COMMIT``, writers queued on a ``flock`` as in the KMS. As in the KMS, the WAL is
checkpointed in the background (SqlStorage.checkpoint_wal), and each worker is set up
before its first request with its objects frozen out of the garbage collector.
Everything else the KMS does is left out: key state, grants and their re-check,
justifications, rate limits, metrics, request logs, error handling and input checks.
The KMS does strictly more per request, so it cannot be faster than this on the same
machine.

Not a server to run: no input is checked. Configured by bench/run.py through
``FLOOR_DATA_DIR`` (a KMS data directory: HSM settings, PIN, root key), ``FLOOR_DB``
(made by ``prepare``, with the wrapped KEK beside it) and ``FLOOR_TOKEN_SHA256``.
"""

from __future__ import annotations

import base64
import fcntl
import gc
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from flask import Flask, request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kms.backends.storage.sql_storage import (
    WAL_BACKSTOP_PAGES,
    SqlStorage,
    make_engine,
)

KEK_ID = "bench-floor-kek"
PREFIX = b"KMS-AUDIT-1\n"
ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode

app = Flask(__name__)
_worker: dict[str, Any] = {}  # per process, filled on the first request (after fork)


def _open(data_dir: str) -> tuple[Any, Any]:
    """A logged-in session and the root key, as a KMS worker has them."""
    import pkcs11
    from pkcs11 import ObjectClass

    from kms import config

    settings = config.from_env({"KMS_DATA_DIR": data_dir})
    os.environ["SOFTHSM2_CONF"] = settings.softhsm2_conf or ""
    token = pkcs11.lib(settings.pkcs11_module).get_token(token_label=settings.token_label)
    session = token.open(user_pin=settings.pin)
    return session, session.get_key(ObjectClass.SECRET_KEY, label=settings.root_key_label)


def prepare(data_dir: str, db: str, contexts: list[dict[str, str]]) -> list[str]:
    """Make the floor's KEK (wrapped under the root key, in ``<db>.kek``), its database,
    and one request body per context (a fresh 32-byte DEK sealed under the KEK). Run it
    in a child process: it initialises PKCS#11."""
    from pkcs11 import GCMParams, KeyType, Mechanism
    from sqlalchemy import create_engine, insert

    from hsm_config import templates
    from kms.backends.storage import schema as t

    session, root = _open(data_dir)
    fresh = session.generate_key(KeyType.AES, 256, store=False, template=templates.KEK_TO_WRAP)
    wrapped = bytes(root.wrap_key(fresh, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    Path(f"{db}.kek").write_bytes(wrapped)
    kek = unwrap_kek(root, wrapped)
    engine = create_engine(f"sqlite:///{db}")
    t.audit_records.create(engine)
    t.audit_head.create(engine)
    with engine.begin() as conn:
        conn.execute(insert(t.audit_head).values(id=1, seq=0, hash="0" * 64))
    with engine.connect() as conn:  # outside a transaction, or SQLite ignores it
        assert conn.exec_driver_sql("PRAGMA journal_mode=WAL").scalar() == "wal"
    engine.dispose()
    bodies = []
    for context in contexts:
        iv = os.urandom(12)
        sealed = kek.encrypt(
            os.urandom(32),
            mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(iv, _aad(context)),
        )
        blob = base64.b64encode(iv + bytes(sealed)).decode()
        bodies.append(json.dumps({"ciphertext": blob, "context": context}))
    session.close()
    return bodies


def unwrap_kek(root: Any, wrapped: bytes) -> Any:
    """A session object of the KEK, usable to encrypt and decrypt, as the KMS caches
    (also the raw SoftHSM measurement's key, bench/common.py)."""
    from pkcs11 import KeyType, Mechanism, ObjectClass

    from hsm_config import templates

    return root.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        wrapped,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        store=False,
        template=templates.KEK_IN_USE,
    )


def _aad(context: dict[str, str]) -> bytes:
    return ENCODE(context).encode()


def _state() -> dict[str, Any]:
    if not _worker:
        session, root = _open(os.environ["FLOOR_DATA_DIR"])
        _worker["kek"] = unwrap_kek(root, Path(os.environ["FLOOR_DB"] + ".kek").read_bytes())
        _worker["session"] = session
        db = sqlite3.connect(os.environ["FLOOR_DB"], isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
        _worker["db"] = db
        _worker["lock"] = os.open(os.environ["FLOOR_DB"] + ".lock", os.O_RDWR | os.O_CREAT)
        _worker["tokens"] = {os.environ["FLOOR_TOKEN_SHA256"]: "bench"}
        # the WAL is checkpointed as the KMS does it: in the background, twice a second
        storage = SqlStorage(make_engine(f"sqlite:///{os.environ['FLOOR_DB']}", "NORMAL"))

        def checkpoints() -> None:
            while True:
                time.sleep(0.5)
                storage.checkpoint_wal()

        threading.Thread(target=checkpoints, daemon=True).start()
    return _worker


if "FLOOR_DB" in os.environ:  # in a gunicorn worker: ready before the first request,
    _state()  # and out of the garbage collector's way, as kms/wsgi.py does
    gc.collect()
    gc.freeze()


COLUMNS = (
    "seq, v, time, request_id, principal, operation, key_id, key_version, context_sha256, "
    "justification, case_id, outcome, detail, prev_hash, hash"
)
FIELDS = COLUMNS.split(", ")[:-1]  # the record's fields, then its hash
INSERT = f"INSERT INTO audit_records ({COLUMNS}) VALUES ({', '.join('?' * 15)})"  # noqa: S608


@app.post("/v1/decrypt")
def decrypt() -> Any:
    """``{"ciphertext", "context"}`` or ``{"items": [...]}`` of them; one record per item,
    all of a request's records appended in one transaction."""
    from pkcs11 import GCMParams, Mechanism

    state = _state()
    bearer = request.headers.get("Authorization", "")[7:].encode()
    principal = state["tokens"].get(hashlib.sha256(bearer).hexdigest())
    if principal is None:
        return {"error": "unauthenticated"}, 401
    body = request.get_json(force=True)
    items = body.get("items") or [body]
    request_id = uuid.uuid4().hex
    opened, records = [], []
    for item in items:
        blob = base64.b64decode(item["ciphertext"])
        aad = _aad(item["context"])
        plaintext = state["kek"].decrypt(
            blob[12:], mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(blob[:12], aad)
        )
        opened.append({"plaintext": base64.b64encode(bytes(plaintext)).decode()})
        records.append(
            {
                "v": 1,
                "request_id": request_id,
                "principal": principal,
                "operation": "decrypt",
                "key_id": KEK_ID,
                "key_version": 1,
                "context_sha256": hashlib.sha256(aad).hexdigest(),
                "justification": "service_processing",
                "case_id": None,
                "outcome": "ok",
                "detail": None,
            }
        )
    db, lock = state["db"], state["lock"]
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            seq, prev = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            now = time.time()
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            stamp = f"{stamp}.{int(now * 1000) % 1000:03d}Z"
            rows = []
            for record in records:
                seq += 1
                record.update(seq=seq, time=stamp, prev_hash=prev)
                prev = hashlib.sha256(PREFIX + ENCODE(record).encode()).hexdigest()
                rows.append([record[c] for c in FIELDS] + [prev])
            db.executemany(INSERT, rows)
            db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
    return {"items": opened} if "items" in body else opened[0]

"""The XKS face records a request's SigV4 nonce in the transaction that commits its audit
record (database replay store): one write transaction per request, and a replay is
refused at that commit with nothing returned and nothing chained."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from tests.functional.test_authorization import _transactions_during
from tests.functional.test_xks import (  # noqa: F401
    PREFIX,
    Xks,
    error,
    issue,
    meta,
    svc,
    xapi,
    xapp,
    xks,
    xks_settings,
)
from tests.helpers import Api, b64


def _body(sealed: dict[str, str]) -> dict[str, Any]:
    return {
        "requestMetadata": meta("Decrypt"),
        "encryptionAlgorithm": "AES_GCM",
        **{k: sealed[k] for k in ("ciphertext", "initializationVector", "authenticationTag")},
        "ciphertextMetadata": sealed["ciphertextMetadata"],
    }


def test_a_replayed_decrypt_is_refused_at_commit(xapi: Api, xks: Xks) -> None:  # noqa: F811
    sealed = xks.encrypt("foo", b"secret").json
    path = f"{PREFIX}/kms/xks/v1/keys/foo/decrypt"
    data, headers = xks.signed(path, _body(sealed))
    first = xks.client.post(path, data=data, headers=headers)
    assert first.status_code == 200 and first.json["plaintext"] == b64(b"secret")
    before = xapi.audit()
    replayed = xks.client.post(path, data=data, headers=headers)
    error(replayed, 401, "AuthenticationFailedException")
    assert b64(b"secret") not in replayed.get_data(as_text=True)
    assert xapi.audit() == before  # failed authentication is logged, never chained


def test_an_xks_decrypt_runs_one_write_transaction(xapp: Any, xks: Xks) -> None:  # noqa: F811
    """Nonce and audit record commit together; with the key's rows cached by the worker
    there is no read transaction either."""
    sealed = xks.encrypt("foo", b"secret").json
    assert xks.decrypt("foo", sealed).status_code == 200  # the worker caches the rows
    calls = []
    count = _transactions_during(xapp, lambda: calls.append(xks.decrypt("foo", sealed)))
    assert calls[0].status_code == 200
    assert count == 1


def test_a_refused_request_keeps_its_nonce(xapi: Api, xks: Xks) -> None:  # noqa: F811
    """A request refused after authentication is audited, and its nonce is recorded in the
    same commit: sending it again is a replay (401), not a second refusal on record."""
    sealed = xks.encrypt("foo", b"secret").json
    path = f"{PREFIX}/kms/xks/v1/keys/foo/decrypt"
    tampered = {**sealed, "authenticationTag": b64(b"\0" * 16)}
    data, headers = xks.signed(path, _body(tampered))
    error(xks.client.post(path, data=data, headers=headers), 400, "InvalidCiphertextException")
    records = xapi.audit()
    assert records[-1]["outcome"] == "decryption_failed"
    error(xks.client.post(path, data=data, headers=headers), 401, "AuthenticationFailedException")
    assert xapi.audit() == records


def test_expired_nonces_are_pruned_in_the_background(xapp: Any, xks: Xks, db_path: Path) -> None:  # noqa: F811
    """The per-worker upkeep deletes expired nonces (recording one never scans the table);
    live ones stay."""
    assert xks.encrypt("foo", b"p").status_code == 200  # one live nonce
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "INSERT INTO sigv4_nonces (nonce, expires_at) VALUES (?, ?)",
            [(f"old{i}", "2000-01-01T00:00:00.000Z") for i in range(2500)],
        )
    xapp.extensions["kms"].sigv4.prune_nonces()
    with sqlite3.connect(db_path) as db:
        (left,) = db.execute("SELECT count(*) FROM sigv4_nonces").fetchone()
    assert left == 1

"""Two KMS nodes (separate gunicorn masters, 2 workers each, on different loopback ports)
sharing one PostgreSQL database, one Redis and one SoftHSM token directory, under a mixed
concurrent load of bearer-token and SigV4 (AWS KMS JSON face) requests: every blob made by
one node opens on the other, a key disabled through one node is refused by the other at
once, a signed request replayed to the other node is refused, and the exported audit
chain verifies with exactly one record per answered request."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.helpers import Server, b64, gunicorn_server, unb64
from tests.pg import PgDatabase
from tests.sigv4_request import signed
from tests.storage.test_pg_nodes import (
    assert_one_linear_chain,
    export_and_verify,
    init,
    wait_for_workers,
)

pytestmark = pytest.mark.e2e
BALANCER = "kms.internal"  # the Host clients sign: the name of a balancer before both nodes
CHAINS = 64  # each: make a blob on one node, open and rewrap it on the other, open that


class Traffic:
    """Every request the test sends, with the request id and status it was answered with."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, int, str]] = []  # (request id, status, what)
        self._lock = threading.Lock()

    def _note(self, r: requests.Response, what: str) -> requests.Response:
        with self._lock:
            self.answers.append((r.headers["X-Request-Id"], r.status_code, what))
        return r

    def native(self, node: Server, token: str, path: str, body: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"}
        r = requests.post(node.url + path, json=body, headers=headers, timeout=30)
        return self._note(r, f"POST {path}")

    def aws(self, node: Server, cred: tuple[str, str], op: str, body: Any) -> requests.Response:
        """A freshly signed AWS KMS JSON API call (botocore's signer)."""
        return self.send(node, sign(cred, op, body), op)

    def send(
        self, node: Server, request: tuple[dict[str, str], bytes], what: str
    ) -> requests.Response:
        """``request`` sent to ``node`` as the load balancer forwards it (its Host)."""
        headers, data = request
        headers = {**headers, "Host": BALANCER}
        return self._note(
            requests.post(node.url + "/", data=data, headers=headers, timeout=30), what
        )


def sign(cred: tuple[str, str], op: str, body: Any) -> tuple[dict[str, str], bytes]:
    """A request to the load balancer in front of both nodes, signed now."""
    return signed(*cred, base_url=f"http://{BALANCER}", target=op, body=body)


def ok(r: requests.Response) -> dict[str, Any]:
    assert r.status_code in (200, 201), r.text
    body: dict[str, Any] = r.json()
    return body


def test_two_nodes_on_one_database_redis_and_token(
    pg_database: PgDatabase, redis_url: str, tmp_path: Path
) -> None:
    data = init(tmp_path / "data", pg_database.url)
    env = {"KMS_REDIS_URL": redis_url}
    t = Traffic()
    with gunicorn_server(data, 2, env) as a, gunicorn_server(data, 2, env) as b:
        nodes = (a, b)
        for node in nodes:
            wait_for_workers(node, 2)
        admin = a.admin_token
        made = ok(t.native(a, admin, "/v1/principals", {"name": "app", "role": "service"}))
        app = made["token"]
        keys = {}
        for alias in ("k1", "k2"):
            keys[alias] = ok(t.native(a, admin, "/v1/keys", {"alias": alias}))["key_id"]
            grant = {"principal": "app", "operations": ["datakey", "encrypt", "decrypt", "rewrap"]}
            ok(t.native(b, admin, f"/v1/keys/{alias}/grants", grant))
        cred_made = ok(t.native(b, admin, "/v1/principals/app/sigv4-credentials", None))
        cred = (cred_made["access_key_id"], cred_made["secret_access_key"])

        def produce(i: int, node: Server, alias: str) -> tuple[bytes, bytes, dict[str, str]]:
            """A blob made on ``node`` in one of four ways: (plaintext, blob, context)."""
            ctx = {"chain": str(i)}
            if i % 4 == 0:
                r = ok(t.native(node, app, f"/v1/keys/{alias}/datakey", {"context": ctx}))
                return unb64(r["plaintext"]), unb64(r["ciphertext"]), ctx
            if i % 4 == 1:
                plain = f"record {i}".encode()
                body = {"plaintext": b64(plain), "context": ctx}
                r = ok(t.native(node, app, f"/v1/keys/{alias}/encrypt", body))
                return plain, unb64(r["ciphertext"]), ctx
            ref = keys[alias]
            if i % 4 == 2:
                body = {"KeyId": ref, "KeySpec": "AES_256", "EncryptionContext": ctx}
                r = ok(t.aws(node, cred, "TrentService.GenerateDataKey", body))
                return unb64(r["Plaintext"]), unb64(r["CiphertextBlob"]), ctx
            plain = f"secret {i}".encode()
            body = {"KeyId": ref, "Plaintext": b64(plain), "EncryptionContext": ctx}
            r = ok(t.aws(node, cred, "TrentService.Encrypt", body))
            return plain, unb64(r["CiphertextBlob"]), ctx

        def open_(i: int, node: Server, blob: bytes, ctx: dict[str, str]) -> bytes:
            if i % 2:  # by i % 4: blobs of each face are opened by both faces
                body = {"ciphertext": b64(blob), "context": ctx}
                return unb64(ok(t.native(node, app, "/v1/decrypt", body))["plaintext"])
            body = {"CiphertextBlob": b64(blob), "EncryptionContext": ctx}
            return unb64(ok(t.aws(node, cred, "TrentService.Decrypt", body))["Plaintext"])

        def rewrap(i: int, node: Server, blob: bytes, ctx: dict[str, str], alias: str) -> bytes:
            if i % 3:
                body = {"ciphertext": b64(blob), "context": ctx, "destination_key": alias}
                return unb64(ok(t.native(node, app, "/v1/rewrap", body))["ciphertext"])
            body = {
                "CiphertextBlob": b64(blob),
                "SourceEncryptionContext": ctx,
                "DestinationKeyId": keys[alias],
                "DestinationEncryptionContext": ctx,
            }
            return unb64(ok(t.aws(node, cred, "TrentService.ReEncrypt", body))["CiphertextBlob"])

        def chain(i: int) -> tuple[str, bytes, dict[str, str], int]:
            here, there = nodes[i % 2], nodes[(i + 1) % 2]
            alias = ("k1", "k2")[(i // 2) % 2]
            plain, blob, ctx = produce(i, here, alias)
            assert open_(i, there, blob, ctx) == plain, i  # made here, opened there
            other_key = ("k2", "k1")[(i // 2) % 2]
            moved = rewrap(i, there, blob, ctx, other_key)  # rewrapped there ...
            assert open_(i + 1, here, moved, ctx) == plain, i  # ... opened here
            return alias, blob, ctx, i

        with ThreadPoolExecutor(max_workers=8) as pool:
            made_blobs = list(pool.map(chain, range(CHAINS)))

        # a key disabled through node A is refused by node B at once (no waiting)
        ok(t.native(a, admin, "/v1/keys/k2/disable", None))
        on_k2 = next((blob, ctx) for alias, blob, ctx, _ in made_blobs if alias == "k2")
        refused = [
            t.native(b, app, "/v1/keys/k2/datakey", {}),
            t.native(b, app, "/v1/decrypt", {"ciphertext": b64(on_k2[0]), "context": on_k2[1]}),
        ]
        for r in refused:
            assert r.status_code == 409 and r.json()["error"]["code"] == "key_state", r.text
        body = {"KeyId": keys["k2"], "Plaintext": b64(b"x")}
        aws_refused = t.aws(b, cred, "TrentService.Encrypt", body)
        assert aws_refused.json()["__type"] == "DisabledException", aws_refused.text
        ok(t.native(b, app, "/v1/keys/k1/datakey", {}))  # the other key still works there

        # a signed request accepted by node A and replayed to node B is refused (Redis)
        once = sign(cred, "TrentService.Encrypt", {"KeyId": keys["k1"], "Plaintext": b64(b"x")})
        ok(t.send(a, once, "TrentService.Encrypt"))
        replayed = t.send(b, once, "replay")
        assert replayed.status_code == 400, replayed.text
        replay_ids = {replayed.headers["X-Request-Id"]}
        assert "already received" in replayed.json()["message"], replayed.text
        nonce = once[0]["Authorization"].rpartition("Signature=")[2]
        with redis.Redis.from_url(redis_url) as store:
            assert store.exists(f"kms:sigv4-nonce:{nonce}")  # the store both nodes read

        ok(t.native(a, admin, "/v1/audit/checkpoints", {}))  # the export ends signed
        records = export_and_verify(b, tmp_path)
        served = [n.log_text().count('"method": "POST"') for n in nodes]
    assert min(served) > 2 * CHAINS  # both nodes carried the load

    assert_one_linear_chain(records)
    per_request = Counter(r["request_id"] for r in records)
    answered = {rid for rid, _, _ in t.answers} - replay_ids
    assert len(answered) == len(t.answers) - len(replay_ids)  # request ids are unique
    assert {rid: per_request[rid] for rid in answered} == dict.fromkeys(answered, 1)
    outcome = {r["request_id"]: r["outcome"] for r in records}
    assert all(
        (outcome[rid] == "ok") == (status < 300) for rid, status, _ in t.answers if rid in answered
    )
    assert not replay_ids & per_request.keys()  # failed authentication is not chained
    # none extra: the only others are `kms init`'s (the export itself is not chained)
    extra = [r["operation"] for r in records if r["request_id"] not in answered]
    assert extra == ["bootstrap_admin", "pin_control_policy"], extra
    failed = [(status, what) for _, status, what in t.answers if status >= 300]
    assert failed == [
        (409, "POST /v1/keys/k2/datakey"),
        (409, "POST /v1/decrypt"),
        (400, "TrentService.Encrypt"),
        (400, "replay"),
    ]

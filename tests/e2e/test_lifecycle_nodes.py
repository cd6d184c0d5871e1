"""The principal lifecycle across two nodes (two gunicorn servers, two workers each, one
PostgreSQL database and one SoftHSM token) and every face: a change made on one node
takes effect at once on the other, with the default authentication cache
(KMS_AUTH_CACHE_SECONDS=5), for bearer tokens, SigV4 credentials (boto3 through the AWS
KMS face) and dashboard sessions. Mutual TLS: tests/e2e/test_mtls.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from kms.client import KmsClient
from tests.helpers import Server, gunicorn_server
from tests.storage.test_pg_nodes import init as init_pg

pytestmark = pytest.mark.e2e

ENV = {"KMS_DASHBOARD_SECURE_COOKIE": "0", "KMS_SCHEDULER_SECONDS": "0"}


def _datakey(srv: Server, token: str) -> int:
    r = requests.post(
        srv.url + "/v1/keys/k/datakey",
        json={},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    return r.status_code


def _aws(srv: Server, cred: dict[str, str]) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=srv.url,
        region_name="us-east-1",
        aws_access_key_id=cred["access_key_id"],
        aws_secret_access_key=cred["secret_access_key"],
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def _dashboard(srv: Server, token: str) -> requests.Session:
    """A browser-like session logged in to ``srv``'s dashboard with ``token``."""
    web, status = _login(srv, token)
    assert status == 303
    return web


def _login(srv: Server, token: str) -> tuple[requests.Session, int]:
    web = requests.Session()
    page = web.get(srv.url + "/dashboard/login", timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    r = web.post(
        srv.url + "/dashboard/login",
        data={"csrf_token": csrf.group(1), "token": token},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code != 303 or r.headers["Location"].endswith("/dashboard/"), r.text
    return web, r.status_code


_N = iter(range(10**6))


def _gdk(aws: Any, key_id: str) -> str:
    """GenerateDataKey, each call distinct (a signature repeated within its second would
    be a replay)."""
    context = {"n": str(next(_N))}
    return str(
        aws.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)["KeyId"]
    )


def _signed_in(srv: Server, web: requests.Session) -> bool:
    r = web.get(srv.url + "/dashboard/", allow_redirects=False, timeout=30)
    assert r.status_code in (200, 303)
    return r.status_code == 200


def test_lifecycle_changes_reach_every_face_of_the_other_node_at_once(
    tmp_path: Path, pg_database: Any
) -> None:
    data = init_pg(tmp_path / "data", pg_database.url)
    with (
        gunicorn_server(data, workers=2, env=ENV) as one,
        gunicorn_server(data, workers=2, env=ENV) as two,
    ):
        admin = KmsClient(one.url, one.admin_token)
        svc = admin.create_principal("svc", "service")["token"]
        key_id = admin.create_key("k")["key_id"]
        admin.grant("k", "svc", ["datakey", "encrypt", "decrypt"])
        auditor = admin.create_principal("carol", "auditor")["token"]
        auth = {"Authorization": f"Bearer {one.admin_token}"}
        cred = requests.post(
            one.url + "/v1/principals/svc/sigv4-credentials", json={}, headers=auth, timeout=30
        ).json()
        aws = _aws(two, cred)
        web = _dashboard(two, auditor)
        for _ in range(4):  # every worker of node two has the callers cached
            assert _datakey(two, svc) == 200
            assert _gdk(aws, key_id)
            assert _signed_in(two, web)

        # disabled on node one: refused on node two at the next request, every face
        admin_one = KmsClient(one.url, one.admin_token)
        assert admin_one.call("POST", "/v1/principals/svc/disable", {})["state"] == "disabled"
        stale = requests.Session()  # a copy of the session cookie, kept for later
        stale.cookies.update(web.cookies)
        assert admin_one.call("POST", "/v1/principals/carol/disable", {})
        for _ in range(4):
            assert _datakey(two, svc) == 401
            assert not _signed_in(two, web)
            with pytest.raises(ClientError) as refused:
                _gdk(aws, key_id)
            assert refused.value.response["Error"]["Code"] == "UnrecognizedClientException"
        assert _login(two, auditor)[1] == 401  # nor can it log in again

        # enabled on node two: back on node one at once
        admin_two = KmsClient(two.url, two.admin_token)
        admin_two.call("POST", "/v1/principals/svc/enable", {})
        admin_two.call("POST", "/v1/principals/carol/enable", {})
        assert _datakey(one, svc) == 200
        assert _gdk(_aws(one, cred), key_id)

        assert not _signed_in(two, stale)  # enabling does not bring old sessions back

        # a session ended on node one is over on node two; a new login works
        web = _dashboard(two, auditor)
        assert _signed_in(two, web)
        admin_one.call("POST", "/v1/principals/carol/sessions/end", {})
        assert not _signed_in(two, web)
        assert _signed_in(two, _dashboard(two, auditor))

        # a token rotated on node one without grace, then the new one revoked: node two
        # follows each step at once
        (old,) = admin_one.call("GET", "/v1/principals/svc/tokens")["tokens"]
        new = admin_one.call("POST", f"/v1/principals/svc/tokens/{old['token_id']}/rotate", {})
        for _ in range(4):
            assert _datakey(two, svc) == 401 and _datakey(two, new["token"]) == 200
        admin_one.call("DELETE", f"/v1/principals/svc/tokens/{new['token_id']}")
        for _ in range(4):
            assert _datakey(two, new["token"]) == 401

        # revoking the token a dashboard session logged in with ends the session
        web = _dashboard(two, auditor)
        (carol_token,) = admin_one.call("GET", "/v1/principals/carol/tokens")["tokens"]
        admin_one.call("DELETE", f"/v1/principals/carol/tokens/{carol_token['token_id']}")
        assert not _signed_in(two, web)

        # every step is in the one audit trail, with the admin who took it
        records = admin_one.audit(after=0, limit=1000)
        done = [
            (x["operation"], x["principal"])
            for x in records
            if x["outcome"] == "ok"
            and x["operation"].endswith(("_principal", "_token", "sessions"))
        ]
        for step in (
            ("disable_principal", "admin"),
            ("enable_principal", "admin"),
            ("end_sessions", "admin"),
            ("rotate_token", "admin"),
            ("revoke_token", "admin"),
        ):
            assert step in done, (step, done)

"""The principal lifecycle (kms/services/principals.py, kms/api/principals.py) on a real
SoftHSM token: disable and enable, tokens listed, issued, rotated with a grace period and
revoked, a maximum lifetime per role, every step audited; bad input refused with
nothing changed; and an insider who writes the database (but not the HSM) cannot undo
any of it. Two nodes and every face over real servers: tests/e2e/test_lifecycle_nodes.py;
mutual TLS: tests/e2e/test_mtls.py; the dashboard: tests/browser/."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kms import config
from kms.app import create_app
from kms.errors import Forbidden
from kms.services.audit_events import Caller
from kms.services.crypto import DataKeyRequest
from tests.helpers import Api, ManualClock
from tests.sigv4_request import signed


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def lapp(settings: config.Settings, hsm: Any, storage: Any, clock: ManualClock) -> Any:
    lifetimes = {"service": 3600}  # KMS_TOKEN_MAX_LIFETIME=service=1h
    return create_app(
        replace(settings, token_max_lifetimes=lifetimes), hsm=hsm, storage=storage, clock=clock
    )


@pytest.fixture
def api(lapp: Any) -> Api:
    token = lapp.extensions["kms"].principals.bootstrap_admin("admin")
    assert token is not None
    return Api(lapp.test_client(), token)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _datakey(api: Api, who: dict[str, str]) -> int:
    return int(api.call("POST", "/v1/keys/k/datakey", who, json={}).status_code)


def _records(api: Api, operation: str) -> list[dict[str, Any]]:
    return [x for x in api.audit() if x["operation"] == operation]


def _sql(db_path: Path, sql: str, *params: Any) -> Any:
    with sqlite3.connect(db_path) as db:
        return db.execute(sql, params).fetchall()


def test_disable_refuses_every_token_and_credential_at_once_and_enable_restores(
    api: Api, clock: ManualClock
) -> None:
    svc = api.principal("service", "svc")
    key_id = api.key("k", grant=svc)
    assert _datakey(api, svc) == 200
    cred = api.call("POST", "/v1/principals/svc/sigv4-credentials", api.admin).json

    def aws_status() -> int:
        headers, body = signed(
            cred["access_key_id"],
            cred["secret_access_key"],
            target="TrentService.GenerateDataKey",
            body={"KeyId": key_id, "KeySpec": "AES_256"},
            when=clock.now_,
        )
        answer = api.client.post("/", data=body, headers=headers)
        assert answer.status_code == 200 or "__type" in json.loads(answer.data)
        return int(answer.status_code)

    assert aws_status() == 200
    off = api.call("POST", "/v1/principals/svc/disable", api.admin, json={})
    assert off.status_code == 200 and off.json["state"] == "disabled"
    assert off.json["disabled_at"] is not None
    refused = api.call("POST", "/v1/keys/k/datakey", svc, json={})
    assert refused.status_code == 401 and refused.json["error"]["code"] == "unauthenticated"
    assert aws_status() == 400  # UnrecognizedClientException, as for an unknown key
    listed = {p["name"]: p for p in api.call("GET", "/v1/principals", api.admin).json["principals"]}
    assert listed["svc"]["state"] == "disabled"
    # idempotent, recorded each time; the refusals are in the trail too
    assert api.call("POST", "/v1/principals/svc/disable", api.admin, json={}).status_code == 200
    assert len(_records(api, "disable_principal")) == 2
    on = api.call("POST", "/v1/principals/svc/enable", api.admin, json={})
    assert on.status_code == 200 and on.json["state"] == "enabled"
    assert _datakey(api, svc) == 200 and aws_status() == 200
    (enabled,) = _records(api, "enable_principal")
    assert enabled["principal"] == "admin" and enabled["detail"] == "name=svc"


def test_a_principal_disabled_after_it_authenticated_is_refused_at_commit(
    api: Api, lapp: Any
) -> None:
    """The key-use pipeline checks the caller's principal row inside the transaction that
    records the use (kms/services/key_work.py): a request in flight when the principal
    is disabled does not complete."""
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    services = lapp.extensions["kms"]
    principal = services.principals.authenticate(svc["Authorization"].split()[1])
    assert api.call("POST", "/v1/principals/svc/disable", api.admin, json={}).status_code == 200
    with pytest.raises(Forbidden) as refused:
        services.crypto.datakey(Caller("in-flight", principal), "k", [DataKeyRequest({})])
    assert "svc is disabled" in str(refused.value.detail)
    (record,) = [x for x in api.audit() if x["request_id"] == "in-flight"]
    assert record["outcome"] == "forbidden" and record["principal"] == "svc"
    assert "svc is disabled" in record["detail"]


def test_an_admin_cannot_disable_itself_nor_the_last_enabled_admin(api: Api) -> None:
    me = api.call("POST", "/v1/principals/admin/disable", api.admin, json={})
    assert me.status_code == 409 and "itself" in me.json["error"]["message"]
    other = api.principal("admin", "other-admin")
    assert api.call("POST", "/v1/principals/admin/disable", other, json={}).status_code == 200
    last = api.call("POST", "/v1/principals/other-admin/disable", other, json={})
    assert last.status_code == 409
    back = api.call("POST", "/v1/principals/admin/enable", other, json={})
    assert back.status_code == 200
    assert api.call("GET", "/v1/principals", api.admin).status_code == 200


def test_tokens_are_listed_rotated_with_a_grace_period_and_revoked(
    api: Api, clock: ManualClock
) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    assert _datakey(api, svc) == 200
    (first,) = api.call("GET", "/v1/principals/svc/tokens", api.admin).json["tokens"]
    assert len(first["token_id"]) == 16 and first["last_used_at"] is not None
    assert first["expires_at"] is not None  # the role's maximum lifetime (1 h)
    old_token = svc["Authorization"].split()[1]
    assert old_token not in json.dumps(api.audit())  # never in the trail
    # the service rotates its own token, keeping the old one for 10 minutes
    path = f"/v1/principals/svc/tokens/{first['token_id']}/rotate"
    rotated = api.call("POST", path, svc, json={"grace_seconds": 600})
    assert rotated.status_code == 201 and rotated.json["replaces"] == first["token_id"]
    new = _bearer(rotated.json["token"])
    assert _datakey(api, new) == 200 and _datakey(api, svc) == 200
    listed = api.call("GET", "/v1/principals/svc/tokens", new).json["tokens"]
    assert [t["token_id"] for t in listed] == [first["token_id"], rotated.json["token_id"]]
    clock.advance(601)
    assert _datakey(api, svc) == 401 and _datakey(api, new) == 200
    (record,) = _records(api, "rotate_token")
    assert record["principal"] == "svc" and f"replaces={first['token_id']}" in record["detail"]
    assert rotated.json["token"] not in json.dumps(api.audit())
    # revoked at once
    gone = api.call("DELETE", f"/v1/principals/svc/tokens/{rotated.json['token_id']}", api.admin)
    assert gone.status_code == 200 and gone.json["state"] == "revoked"
    assert _datakey(api, new) == 401
    assert len(_records(api, "revoke_token")) == 1
    # an admin issues a new token; the role's cap still applies
    issued = api.call("POST", "/v1/principals/svc/tokens", api.admin, json={"ttl_seconds": 86400})
    assert issued.status_code == 201
    assert _datakey(api, _bearer(issued.json["token"])) == 200
    clock.advance(3601)  # past the service role's 1 h maximum, though 24 h were asked
    assert _datakey(api, _bearer(issued.json["token"])) == 401


def test_another_principal_may_not_touch_tokens_that_are_not_its_own(api: Api) -> None:
    svc, other = api.principal("service", "svc"), api.principal("service", "other")
    (tok,) = api.call("GET", "/v1/principals/svc/tokens", svc).json["tokens"]
    for method, path, body in (
        ("GET", "/v1/principals/svc/tokens", None),
        ("POST", f"/v1/principals/svc/tokens/{tok['token_id']}/rotate", {}),
        ("DELETE", f"/v1/principals/svc/tokens/{tok['token_id']}", None),
        ("POST", "/v1/principals/svc/tokens", {}),
        ("POST", "/v1/principals/svc/sessions/end", {}),
        ("POST", "/v1/principals/svc/disable", {}),
    ):
        r = api.call(method, path, other, json=body)
        assert r.status_code == 403, (path, r.json)
    assert {x["outcome"] for x in _records(api, "revoke_token")} == {"forbidden"}
    assert len(api.call("GET", "/v1/principals/svc/tokens", svc).json["tokens"]) == 1
    # a service may not issue itself more tokens (only rotate one it holds)
    assert api.call("POST", "/v1/principals/svc/tokens", svc, json={}).status_code == 403


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/principals/nobody/disable", {}, 404),
        ("POST", "/v1/principals/svc/disable", {"why": "x"}, 400),
        ("POST", "/v1/principals/svc/disable", [], 400),
        ("POST", "/v1/principals/bad%20name/disable", {}, 400),
        ("GET", "/v1/principals/svc/tokens/../tokens", None, 404),
        ("DELETE", "/v1/principals/svc/tokens/0123", None, 400),
        ("DELETE", "/v1/principals/svc/tokens/00000000000000ff", None, 404),
        ("POST", "/v1/principals/svc/tokens/00000000000000ff/rotate", {}, 404),
        ("POST", "/v1/principals/svc/tokens/XYZ/rotate", {}, 400),
        ("POST", "/v1/principals/svc/tokens", {"ttl_seconds": "60"}, 400),
        ("POST", "/v1/principals/svc/tokens", {"ttl_seconds": 59}, 400),
        ("POST", "/v1/principals/svc/tokens", {"ttl_seconds": True}, 400),
        ("POST", "/v1/principals/svc/tokens", {"ttl_seconds": 10**12}, 400),
        ("POST", "/v1/principals/svc/tokens", {"token": "kms_x"}, 400),
        ("POST", "/v1/principals/svc/sessions/end", {"x": 1}, 400),
    ],
)
def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    api: Api, method: str, path: str, body: Any, status: int
) -> None:
    svc = api.principal("service", "svc")
    before = api.call("GET", "/v1/principals/svc/tokens", api.admin).json
    r = api.call(method, path, api.admin, json=body)
    assert r.status_code == status, r.json
    assert r.json["error"]["code"] and r.json["error"]["message"]
    assert api.call("GET", "/v1/principals/svc/tokens", api.admin).json == before
    assert _datakey(api, svc) in (403, 404)  # no key: the token still authenticates


def test_a_grace_period_beyond_the_limit_or_on_an_expired_token_is_refused(
    api: Api, clock: ManualClock
) -> None:
    api.principal("service", "svc")
    (tok,) = api.call("GET", "/v1/principals/svc/tokens", api.admin).json["tokens"]
    path = f"/v1/principals/svc/tokens/{tok['token_id']}/rotate"
    too_long = api.call("POST", path, api.admin, json={"grace_seconds": 31 * 86400})
    assert too_long.status_code == 400
    clock.advance(3601)  # the 1 h maximum passed
    expired = api.call("POST", path, api.admin, json={})
    assert expired.status_code == 409 and "expired" in expired.json["error"]["message"]
    assert len(api.call("GET", "/v1/principals/svc/tokens", api.admin).json["tokens"]) == 1


# -- an insider who writes the database, but not the HSM --------------------------------


def test_database_edits_cannot_undo_a_disable_a_revocation_or_an_expiry(
    api: Api, db_path: Path, clock: ManualClock
) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    assert _datakey(api, svc) == 200
    cols = "disabled_at, sessions_since, seal"
    row = _sql(db_path, f"SELECT {cols} FROM principals WHERE name = 'svc'")[0]  # noqa: S608
    assert api.call("POST", "/v1/principals/svc/disable", api.admin, json={}).status_code == 200
    # 1. the enabled row written back, with the seal it had then: an older sealed copy
    put_back = (
        "UPDATE principals SET disabled_at = ?, sessions_since = ?, seal = ? WHERE name = 'svc'"
    )
    _sql(db_path, put_back, *row)
    assert _datakey(api, svc) == 401
    assert "older sealed copy" in api.audit()[-1]["detail"]
    # 2. the disabled row with its date cleared: the seal no longer verifies
    api.call("POST", "/v1/principals/svc/enable", api.admin, json={})  # (refused: row broken)
    _sql(db_path, "UPDATE principals SET disabled_at = NULL WHERE name = 'svc'")
    assert _datakey(api, svc) == 401

    # 3. a revoked token inserted back, with its old seal
    other = api.principal("service", "other")
    api.key("k2", grant=other)
    assert api.call("POST", "/v1/keys/k2/datakey", other, json={}).status_code == 200
    (token_row,) = _sql(
        db_path,
        "SELECT t.* FROM tokens t JOIN principals p ON p.id = t.principal_id "
        "WHERE p.name = 'other'",
    )
    (tok,) = api.call("GET", "/v1/principals/other/tokens", api.admin).json["tokens"]
    api.call("DELETE", f"/v1/principals/other/tokens/{tok['token_id']}", api.admin)
    marks = ",".join("?" * len(token_row))
    _sql(db_path, f"INSERT INTO tokens VALUES ({marks})", *token_row)  # noqa: S608
    assert api.call("POST", "/v1/keys/k2/datakey", other, json={}).status_code == 401

    # 4. a token's expiry pushed back (or removed) in the database
    third = api.principal("service", "third")
    api.key("k3", grant=third)
    _sql(
        db_path,
        "UPDATE tokens SET expires_at = NULL WHERE principal_id = "
        "(SELECT id FROM principals WHERE name = 'third')",
    )
    assert api.call("POST", "/v1/keys/k3/datakey", third, json={}).status_code == 401
    alarms = [x for x in api.audit() if "does not verify" in (x["detail"] or "")]
    assert alarms  # each broken seal raised an alarm record

"""The authorization matrix: every role against every endpoint."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Api

ROLES = ("admin", "service", "auditor", "custodian", "requester", "anonymous", "bad-token")

# endpoint name -> (method, path, body, roles allowed)
ENDPOINTS: dict[str, tuple[str, str, Any, set[str]]] = {
    "create_principal": ("POST", "/v1/principals", {"name": "new", "role": "service"}, {"admin"}),
    "list_principals": ("GET", "/v1/principals", None, {"admin"}),
    "create_key": ("POST", "/v1/keys", {"alias": "fresh"}, {"admin"}),
    "list_keys": ("GET", "/v1/keys", None, {"admin", "auditor"}),
    "describe_key": ("GET", "/v1/keys/k", None, {"admin", "auditor"}),
    "grant": (
        "POST",
        "/v1/keys/k/grants",
        {"principal": "svc", "operations": ["decrypt"]},
        {"admin"},
    ),
    "rotate": ("POST", "/v1/keys/k/rotate", {}, {"admin"}),
    "disable": ("POST", "/v1/keys/k/disable", {}, {"admin"}),
    "enable": ("POST", "/v1/keys/k/enable", {}, {"admin"}),
    "schedule_deletion": ("POST", "/v1/keys/k/schedule-deletion", {"pending_days": 7}, {"admin"}),
    "cancel_deletion": ("POST", "/v1/keys/k/cancel-deletion", {}, {"admin"}),
    "datakey": ("POST", "/v1/keys/k/datakey", {}, {"service"}),
    "encrypt": ("POST", "/v1/keys/k/encrypt", {"plaintext": "aGk="}, {"service"}),
    "decrypt": ("POST", "/v1/decrypt", "BLOB", {"service"}),
    "rewrap": ("POST", "/v1/rewrap", "BLOB", {"service"}),
    "audit": ("GET", "/v1/audit", None, {"admin", "auditor"}),
}


def _headers(api: Api, role: str, svc: dict[str, str]) -> dict[str, str]:
    if role == "anonymous":
        return {}
    if role == "bad-token":
        return {"Authorization": "Bearer kms_not-a-real-token"}
    if role == "admin":
        return api.admin
    return svc if role == "service" else api.principal(role)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_matrix(api: Api, endpoint: str, role: str) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    blob = api.call("POST", "/v1/keys/k/datakey", svc, json={}).json["ciphertext"]
    if endpoint == "cancel_deletion":
        api.call("POST", "/v1/keys/k/schedule-deletion", api.admin, json={"pending_days": 7})
    if endpoint == "enable":
        api.call("POST", "/v1/keys/k/disable", api.admin)
    method, path, body, allowed = ENDPOINTS[endpoint]
    if body == "BLOB":
        body = {"ciphertext": blob}
    headers = _headers(api, role, svc)
    before = len(api.audit())
    r = api.call(method, path, headers, json=body)
    if role in allowed:
        assert r.status_code in (200, 201), (r.status_code, r.json)
    elif role in ("anonymous", "bad-token"):
        assert r.status_code == 401 and r.json["error"]["code"] == "unauthenticated"
    else:
        assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
    records = api.audit()[before:]
    if r.status_code >= 400:
        # exactly one record: the refusal, attributed to whoever asked
        assert len(records) == 1 and records[0]["outcome"] == r.json["error"]["code"]
        assert "plaintext" not in r.json

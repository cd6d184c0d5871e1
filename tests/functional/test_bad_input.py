"""Malformed, wrong-typed, unknown, oversized and hostile input: a specific 4xx JSON error,
never a 500, and nothing written but the audit record of the refusal."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import Api, b64

POSTS = [
    "/v1/principals",
    "/v1/keys",
    "/v1/keys/k/grants",
    "/v1/keys/k/rotate",
    "/v1/keys/k/disable",
    "/v1/keys/k/enable",
    "/v1/keys/k/schedule-deletion",
    "/v1/keys/k/cancel-deletion",
    "/v1/keys/k/datakey",
    "/v1/keys/k/encrypt",
    "/v1/decrypt",
    "/v1/rewrap",
]

BAD_BODIES: dict[str, Any] = {
    "not json": "{not json",
    "json array": "[1, 2]",
    "json string": '"hello"',
    "unknown field": '{"surprise": 1}',
    "deep nesting": "[" * 100000 + "]" * 100000,
    "invalid utf-8": b"\xff\xfe{",
}


def _state(api: Api) -> tuple[Any, ...]:
    keys = api.call("GET", "/v1/keys", api.admin).json["keys"]
    principals = api.call("GET", "/v1/principals", api.admin).json["principals"]
    return tuple(map(repr, (keys, principals)))


def _actor(api: Api, path: str, svc: dict[str, str]) -> dict[str, str]:
    return svc if path.endswith(("datakey", "encrypt", "decrypt", "rewrap")) else api.admin


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
def test_malformed_bodies(api: Api, kind: str) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    for path in POSTS:
        before_state, before_audit = _state(api), len(api.audit())
        r = api.call(
            "POST",
            path,
            _actor(api, path, svc),
            data=BAD_BODIES[kind],
            content_type="application/json",
        )
        assert r.status_code == 400, (path, r.status_code, r.get_data()[:200])
        assert r.json["error"]["code"] == "invalid_request" and r.json["error"]["request_id"]
        assert _state(api) == before_state
        records = api.audit()[before_audit:]
        assert [x["outcome"] for x in records] == ["invalid_request"], path


WRONG_FIELDS = [
    ("/v1/principals", {"name": 5, "role": "service"}),
    ("/v1/principals", {"name": "x", "role": "emperor"}),
    ("/v1/principals", {"name": "bad name!", "role": "service"}),
    ("/v1/principals", {"name": "x" * 65, "role": "service"}),
    ("/v1/principals", {"name": "admin\n", "role": "admin"}),
    ("/v1/principals", {"name": "x"}),
    ("/v1/keys", {"alias": ["a"]}),
    ("/v1/keys", {"alias": "has space"}),
    ("/v1/keys", {"alias": "trailing-newline\n"}),
    ("/v1/keys", {"alias": "12345678-1234-1234-1234-123456789abc"}),
    ("/v1/keys", {"description": "x" * 1025}),
    ("/v1/keys/k/grants", {"principal": "svc", "operations": "decrypt"}),
    ("/v1/keys/k/grants", {"principal": "svc", "operations": [1]}),
    ("/v1/keys/k/schedule-deletion", {"pending_days": "7"}),
    ("/v1/keys/k/schedule-deletion", {"pending_days": 7.5}),
    ("/v1/keys/k/schedule-deletion", {"pending_days": True}),
    ("/v1/keys/k/rotate", {"force": True}),
    ("/v1/keys/k/datakey", {"context": "tenant=1"}),
    ("/v1/keys/k/datakey", {"context": {"a": 1}}),
    ("/v1/keys/k/datakey", {"include_plaintext": "yes"}),
    ("/v1/keys/k/encrypt", {"plaintext": "not base64!"}),
    ("/v1/keys/k/encrypt", {"plaintext": "aGk"}),  # missing padding
    ("/v1/keys/k/encrypt", {"plaintext": 12}),
    ("/v1/keys/k/encrypt", {}),
    ("/v1/keys/k/encrypt", {"plaintext": b64(b"x" * 5000)}),
    ("/v1/decrypt", {"ciphertext": None}),
    ("/v1/decrypt", {"ciphertext": "AAAA", "justification": 3}),
    ("/v1/decrypt", {"items": "all"}),
    ("/v1/decrypt", {"items": []}),
    ("/v1/decrypt", {"items": [5]}),
    ("/v1/decrypt", {"items": [], "ciphertext": "AAAA"}),
    ("/v1/rewrap", {"ciphertext": "AAAA", "destination_key": {"id": 1}}),
]


@pytest.mark.parametrize(("path", "body"), WRONG_FIELDS)
def test_wrong_fields(api: Api, path: str, body: dict[str, Any]) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    before_state, before_audit = _state(api), len(api.audit())
    r = api.call("POST", path, _actor(api, path, svc), json=body)
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request", r.json
    assert _state(api) == before_state
    assert len(api.audit()) == before_audit + 1


def test_oversized_body_is_413(api: Api) -> None:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    before = len(api.audit())
    r = api.call(
        "POST",
        "/v1/decrypt",
        svc,
        data=b"{" + b" " * (9 * 1024 * 1024) + b"}",
        content_type="application/json",
    )
    assert r.status_code == 413 and r.json["error"]["code"] == "payload_too_large"
    assert [x["outcome"] for x in api.audit()[before:]] == ["payload_too_large"]


def test_bad_query_parameters(api: Api) -> None:
    for query in (
        "after=-1",
        "after=abc",
        "limit=0",
        "limit=1001",
        "limit=1e3",
        "after=%C2%B2",
        "after=%D9%A3",
        "since=yesterday",
        "key_id=",
    ):
        r = api.call("GET", f"/v1/audit?{query}", api.admin)
        assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request", query


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Basic abc", "Bearer kms_" + "a" * 500, "bearer\tkms_x", "Bearer \x00"],
)
def test_hostile_authorization_headers(api: Api, header: str) -> None:
    r = api.call("GET", "/v1/keys", {"Authorization": header})
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthenticated"


def test_unknown_paths_and_methods(api: Api) -> None:
    assert api.call("GET", "/v1/nothing-here").status_code == 404
    assert api.call("DELETE", "/v1/keys", api.admin).status_code == 405
    r = api.call("GET", "/v1/keys/%2e%2e%2f%2e%2e", api.admin)
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"

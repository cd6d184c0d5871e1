"""Path parameters and query arguments that are not plain text (NUL, control characters)
get a 400 with an audit record of the refusal, before any look-up: on PostgreSQL a NUL
used to reach the driver, which refused it, and the caller saw 503 as if the database
were down (tests/storage/test_pg_hostile_paths.py runs this module there)."""

from __future__ import annotations

import pytest

from tests.helpers import Api

HOSTILE = [
    ("GET", "/v1/keys/a%00b"),
    ("POST", "/v1/keys/a%00b/datakey"),
    ("POST", "/v1/keys/a%1bb/encrypt"),
    ("GET", "/v1/escrow/cases/a%00b"),
    ("GET", "/v1/audit?principal=%00"),
    ("GET", "/v1/audit?key_id=a%07"),
]


@pytest.mark.parametrize(("method", "path"), HOSTILE)
def test_control_characters_in_paths_and_queries_are_refused(
    api: Api, method: str, path: str
) -> None:
    svc = api.principal("service", "svc")
    who = svc if "datakey" in path or "encrypt" in path else api.admin
    before = len(api.audit())
    r = api.call(method, path, who, json={} if method == "POST" else None)
    assert r.status_code == 400, r.json
    assert r.json["error"]["code"] == "invalid_request"
    assert "control characters" in r.json["error"]["message"]
    refused = api.audit()[before:]
    assert [x["outcome"] for x in refused] == ["invalid_request"]
    assert refused[0]["request_id"] == r.headers["X-Request-Id"]


def test_an_absurd_pending_deletion_is_refused_not_overflowed(api: Api) -> None:
    api.key("k")
    r = api.call(
        "POST", "/v1/keys/k/schedule-deletion", api.admin, json={"pending_days": 159085830}
    )
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request"
    assert api.call("GET", "/v1/keys/k", api.admin).json["state"] == "enabled"
    assert api.audit()[-1]["outcome"] == "invalid_request"

"""Dashboard refusals that no service saw (bad form values) still leave their audit
record, through the Flask test client over https (the session cookie is Secure)."""

from __future__ import annotations

import re
from typing import Any

from tests.helpers import Api

HTTPS = {"base_url": "https://localhost"}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def _login(client: Any, token: str) -> str:
    page = client.get("/dashboard/login", **HTTPS).get_data(as_text=True)
    r = client.post("/dashboard/login", data={"csrf_token": _csrf(page), "token": token}, **HTTPS)
    assert r.status_code == 303, r.get_data(as_text=True)[:300]
    return _csrf(client.get("/dashboard/", **HTTPS).get_data(as_text=True))


def test_a_bad_form_value_is_refused_and_audited(api: Api) -> None:
    api.key("k")
    token = api.admin["Authorization"].removeprefix("Bearer ")
    csrf = _login(api.client, token)
    before = len(api.audit())
    r = api.client.post(
        "/dashboard/keys/k/retire",
        data={"csrf_token": csrf, "up_to_version": "x", "confirm": "yes"},
        **HTTPS,
    )
    assert r.status_code == 400
    assert api.call("GET", "/v1/keys/k", api.admin).json["min_decryption_version"] == 1
    added = api.audit()[before:]
    assert [(x["operation"], x["outcome"], x["principal"]) for x in added] == [
        ("configure_key", "invalid_request", "admin")
    ]

"""Dashboard sessions: an expired one sends the browser to the login page with a clear
message and the action is not performed; the cookie is signed with a key only the HSM
can make; a session is only as good as its principal's current role."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer
from playwright.sync_api import Page, expect

from kms.backends.hsm import Pkcs11Hsm
from kms.services.principals import token_hash
from tests.browser.support import SERVER_ENV, Admin, login
from tests.helpers import Api, Server, gunicorn_server, init_data_dir

pytestmark = pytest.mark.e2e
LIFETIME = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = init_data_dir(tmp_path_factory.mktemp("dashboard-short-sessions"))
    env = {**SERVER_ENV, "KMS_DASHBOARD_SESSION_SECONDS": str(LIFETIME)}
    with gunicorn_server(data, workers=2, env=env) as srv:
        yield srv


def test_expired_session_redirects_to_login_and_does_nothing(
    server: Server, admin: Admin, page: Page
) -> None:
    admin.key("slow")
    login(page, server, server.admin_token)
    page.goto(server.url + "/dashboard/keys/slow")
    expect(page.locator("#current-version")).to_have_text("1")
    time.sleep(LIFETIME + 1.5)
    page.get_by_role("button", name="Rotate now").click()
    expect(page).to_have_url(server.url + "/dashboard/login")
    expect(page.get_by_role("alert")).to_have_text(
        "Your session expired. Log in again; nothing was changed."
    )
    assert admin.describe("slow")["current_version"] == 1
    assert admin.audit(operation="rotate_key") == []
    # pages are refused the same way, and a new login works at once
    page.goto(server.url + "/dashboard/")
    expect(page).to_have_url(server.url + "/dashboard/login")
    login(page, server, server.admin_token)
    page.goto(server.url + "/dashboard/keys/slow")
    page.get_by_role("button", name="Rotate now").click()
    expect(page.locator("#current-version")).to_have_text("2")


def _signed(key: bytes, data: dict[str, Any]) -> str:
    """A session cookie value as Flask signs it, with ``key``."""
    flask_sessions = SecureCookieSessionInterface
    return URLSafeTimedSerializer(
        key,
        salt=flask_sessions.salt,
        serializer=flask_sessions.serializer,
        signer_kwargs={
            "key_derivation": flask_sessions.key_derivation,
            "digest_method": flask_sessions.digest_method,
        },
    ).dumps(data)


def test_session_key_comes_from_the_hsm_and_other_keys_are_refused(
    app: Any, api: Api, hsm: Pkcs11Hsm
) -> None:
    """Any process logged in to the token derives the same key (so every worker and node
    accepts the session); a cookie signed with anything else is no session at all."""
    hsm_key = hsm.mac(b"kms-dashboard-session-v1")
    session = {
        "name": "admin",
        "role": "admin",
        "token_id": token_hash(api.admin["Authorization"].removeprefix("Bearer "))[:16],
        "login_at": time.time(),
        "csrf": "t",
    }
    for key, status in ((hsm_key, 200), (b"k" * 32, 303)):
        client = app.test_client()
        client.set_cookie("kms_dashboard", _signed(key, session), path="/dashboard")
        answer = client.get("/dashboard/")
        assert answer.status_code == status
        if status == 303:
            assert answer.headers["Location"] == "/dashboard/login"
    # the session names a role; the principal's current role must match it
    api.principal("auditor", "carol")
    client = app.test_client()
    forged = {**session, "name": "carol"}
    client.set_cookie("kms_dashboard", _signed(hsm_key, forged), path="/dashboard")
    answer = client.get("/dashboard/")
    assert answer.status_code == 303 and answer.headers["Location"] == "/dashboard/login"
    assert b"no longer valid" in client.get("/dashboard/login").data

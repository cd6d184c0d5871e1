"""Dashboard bad input and security properties, in a real browser against a live server:
refused logins, forged and missing CSRF tokens, the read-only auditor, cookie flags,
security headers, logout, no JavaScript needed, accessible markup."""

from __future__ import annotations

import base64
import json
import re
import zlib
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.browser.support import Admin, csrf_of, login, post_form
from tests.helpers import Server

pytestmark = pytest.mark.e2e


def _post(page: Page) -> Any:
    return page.expect_response(lambda r: r.request.method == "POST")


def test_wrong_token_or_role_is_refused_at_login(server: Server, admin: Admin, page: Page) -> None:
    with _post(page) as answer:
        login(page, server, "kms_not-a-real-token")
    assert answer.value.status == 401
    expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    expect(page.get_by_label("Access token")).to_have_attribute("aria-invalid", "true")
    service = admin.principal("svc-login", "service")
    with _post(page) as answer:
        login(page, server, service)
    assert answer.value.status == 403
    expect(page.get_by_role("alert")).to_have_text("That token's role may not use the dashboard.")
    page.goto(server.url + "/dashboard/")
    expect(page).to_have_url(server.url + "/dashboard/login")  # still not logged in
    # the refused role is chained against its principal; the unknown token only logged
    logins = [(r["principal"], r["outcome"]) for r in admin.audit(operation="dashboard_login")]
    assert ("svc-login", "forbidden") in logins
    assert all(name is not None for name, _ in logins)
    assert "kms_not-a-real-token" not in server.log_text() and service not in server.log_text()


def test_forged_or_missing_csrf_token_is_refused_and_changes_nothing(
    server: Server, admin: Admin, page: Page
) -> None:
    admin.key("csrf-target")
    assert admin.call("POST", "/v1/keys/csrf-target/rotate", json={}).status_code == 200
    login(page, server, server.admin_token)
    key_page = server.url + "/dashboard/keys/csrf-target"
    rotate_form = "form:has(button:text('Rotate now')) input[name=csrf_token]"
    for tamper in ("e => { e.value = 'forged-' + e.value }", "e => e.remove()"):
        page.goto(key_page)
        page.locator(rotate_form).evaluate(tamper)
        with _post(page) as answer:
            page.get_by_role("button", name="Rotate now").click()
        assert answer.value.status == 400
        expect(page.locator("#error-message")).to_have_text(
            "invalid or missing CSRF token; nothing was changed"
        )
        expect(page).to_have_title(re.compile("^Error 400"))
        assert admin.describe("csrf-target")["current_version"] == 2
    # the confirmed retire form, forged: refused too
    page.goto(key_page)
    answer = post_form(
        page,
        "/dashboard/keys/csrf-target/retire",
        server,
        {"csrf_token": "forged", "up_to_version": "1", "confirm": "yes", "step": "confirm"},
    )
    assert answer.status == 400 and "invalid or missing CSRF token" in answer.text()
    assert admin.describe("csrf-target")["min_decryption_version"] == 1
    # each refusal is recorded against the session's principal, with the reason
    refused = [
        (r["principal"], r["operation"], r["detail"]) for r in admin.audit(outcome="csrf_invalid")
    ]
    assert refused == [
        ("admin", "rotate_key", "mismatch"),
        ("admin", "rotate_key", "missing"),
        ("admin", "configure_key", "mismatch"),
    ]


def test_login_form_needs_its_csrf_token(server: Server, admin: Admin, page: Page) -> None:
    page.goto(server.url + "/dashboard/login")
    page.locator("input[name=csrf_token]").evaluate("e => { e.value = 'forged' }")
    page.get_by_label("Access token").fill(server.admin_token)
    with _post(page) as answer:
        page.get_by_role("button", name="Log in").click()
    assert answer.value.status == 400
    expect(page.locator("#error-message")).to_contain_text("invalid or missing CSRF token")
    page.goto(server.url + "/dashboard/")
    expect(page).to_have_url(server.url + "/dashboard/login")


def test_auditor_is_read_only(server: Server, admin: Admin, page: Page) -> None:
    admin.key("audited")
    assert admin.call("POST", "/v1/keys/audited/rotate", json={}).status_code == 200
    login(page, server, admin.principal("carol", "auditor"))
    expect(page.locator("form.who")).to_contain_text("carol (auditor, read-only)")
    page.goto(server.url + "/dashboard/keys/audited")
    expect(page.locator("#current-version")).to_have_text("2")
    expect(page.get_by_role("button", name="Rotate now")).to_have_count(0)
    expect(page.get_by_label("Retire all versions up to")).to_have_count(0)
    # the actions, posted by hand with a valid session and CSRF token: 403, nothing done
    csrf = csrf_of(page)
    rotate = post_form(page, "/dashboard/keys/audited/rotate", server, {"csrf_token": csrf})
    assert rotate.status == 403 and "needs the role admin" in rotate.text()
    retire = post_form(
        page,
        "/dashboard/keys/audited/retire",
        server,
        {"csrf_token": csrf, "up_to_version": "1", "confirm": "yes", "step": "confirm"},
    )
    assert retire.status == 403
    key = admin.describe("audited")
    assert (key["current_version"], key["min_decryption_version"]) == (2, 1)
    refused = {(r["operation"], r["outcome"]) for r in admin.audit(principal="carol")}
    assert {("rotate_key", "forbidden"), ("configure_key", "forbidden")} <= refused
    # verifying the audit chain is open to auditors (a signature must cover it)
    assert admin.call("POST", "/v1/audit/checkpoints", json={}).status_code == 201
    page.goto(server.url + "/dashboard/")
    page.get_by_role("button", name="Verify now").click()
    expect(page.get_by_role("status")).to_contain_text("Audit chain verified")
    assert admin.audit(operation="verify_audit", principal="carol")[-1]["outcome"] == "ok"


def _cookie_payload(value: str) -> dict[str, Any]:
    """The JSON inside Flask's signed cookie (readable, not secret: it must hold none)."""
    compressed = value.startswith(".")
    body = value.lstrip(".").split(".")[0]
    data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    return dict(json.loads(zlib.decompress(data) if compressed else data))


def test_session_cookie_flags_and_security_headers(
    server: Server, page: Page, context: BrowserContext
) -> None:
    first = page.goto(server.url + "/dashboard/login")
    assert first is not None
    headers = first.headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    login(page, server, server.admin_token)
    expect(page).to_have_url(server.url + "/dashboard/")
    (cookie,) = [c for c in context.cookies() if c["name"] == "kms_dashboard"]
    assert cookie["httpOnly"] is True
    assert cookie["secure"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    assert cookie["expires"] == -1  # ends with the browser session
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it
    payload = _cookie_payload(cookie["value"])
    assert {"name", "role", "login_at", "csrf"} <= set(payload)
    assert payload["name"] == "admin" and payload["role"] == "admin"
    assert server.admin_token not in json.dumps(payload)
    # the API is not the dashboard: no session cookie is sent or set there
    api = page.request.get(server.url + "/healthz")
    assert "set-cookie" not in api.headers


def test_logout_ends_the_session(server: Server, admin: Admin, page: Page) -> None:
    login(page, server, server.admin_token)
    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(server.url + "/dashboard/login")
    expect(page.get_by_role("status")).to_have_text("You are logged out.")
    page.goto(server.url + "/dashboard/audit")
    expect(page).to_have_url(server.url + "/dashboard/login")
    assert admin.audit(operation="dashboard_logout")[-1]["principal"] == "admin"


def test_works_without_javascript(server: Server, admin: Admin, browser: Browser) -> None:
    admin.key("no-script")
    ctx = browser.new_context(java_script_enabled=False)
    try:
        page = ctx.new_page()
        login(page, server, server.admin_token)
        page.locator("#keys").get_by_role("link", name="no-script").click()
        page.get_by_role("button", name="Rotate now").click()
        expect(page.locator("#current-version")).to_have_text("2")
        page.get_by_role("link", name="Audit records", exact=True).click()
        page.get_by_label("Key (alias or id)").fill("no-script")
        page.get_by_role("button", name="Filter").click()
        expect(page.locator("#records tbody tr").first).to_contain_text("rotate_key")
    finally:
        ctx.close()
    assert admin.describe("no-script")["current_version"] == 2


A11Y_CHECK = """() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push('no lang');
  if (!document.title.trim()) problems.push('no title');
  if (document.querySelectorAll('script').length) problems.push('script element');
  if (document.querySelectorAll('h1').length !== 1) problems.push('not one h1');
  for (const el of document.querySelectorAll('input, select, textarea')) {
    if (el.type !== 'hidden' && el.labels.length === 0) problems.push('unlabelled ' + el.name);
  }
  for (const th of document.querySelectorAll('table th')) {
    if (!th.getAttribute('scope')) problems.push('th without scope: ' + th.textContent.trim());
  }
  for (const el of document.querySelectorAll('[style]')) problems.push('inline style');
  return problems;
}"""


def test_pages_have_accessible_markup(server: Server, admin: Admin, page: Page) -> None:
    admin.key("a11y")
    assert admin.call("POST", "/v1/keys/a11y/rotate", json={}).status_code == 200
    page.goto(server.url + "/dashboard/login")
    assert page.evaluate(A11Y_CHECK) == []
    login(page, server, server.admin_token)
    for path in ("/dashboard/", "/dashboard/keys/a11y", "/dashboard/audit?key=a11y"):
        page.goto(server.url + path)
        assert page.evaluate(A11Y_CHECK) == [], path
    # the retire confirmation page too
    page.goto(server.url + "/dashboard/keys/a11y")
    page.get_by_role("button", name="Retire…").click()
    assert page.evaluate(A11Y_CHECK) == []
    # focus is visible: the focused button gets an outline
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"


def test_bad_input_gets_a_clear_error_page(server: Server, page: Page) -> None:
    login(page, server, server.admin_token)
    for path, status, text in (
        ("/dashboard/keys/no-such-key", 404, "no such key"),
        ("/dashboard/audit?key=no-such-key", 404, "no such key"),
        ("/dashboard/audit?limit=0", 400, "limit must be a whole number"),
        ("/dashboard/audit?outcome=%3Cscript%3E", 400, "outcome must be"),
    ):
        answer = page.goto(server.url + path)
        assert answer is not None and answer.status == status, path
        expect(page.locator("#error-message")).to_contain_text(text)
    csrf = csrf_of(page)
    bad = post_form(
        page,
        "/dashboard/keys/no-such-key/retire",
        server,
        {"csrf_token": csrf, "up_to_version": "x"},
    )
    assert bad.status == 400 and "up_to_version must be a whole number" in bad.text()

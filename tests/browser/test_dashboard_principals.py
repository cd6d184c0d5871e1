"""The Principals page of the dashboard in a real browser against a live server: an admin
disables and enables a principal, revokes a token and ends dashboard sessions, each
taking effect at once on the API and in other browsers; auditors only read; forms without
their CSRF token change nothing. No token is ever shown in a page."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.support import Admin, csrf_of, login, post_form, shot
from tests.browser.test_dashboard_security import A11Y_CHECK
from tests.helpers import Server

pytestmark = pytest.mark.e2e
NO_LONGER_VALID = "Your session is no longer valid. Log in again."


def _service(admin: Admin, name: str) -> tuple[str, str]:
    """A service principal with a key it may use: (its token, the key's alias)."""
    token = admin.principal(name, "service")
    admin.key(f"{name}-key", grant_to=name)
    return token, f"{name}-key"


def _datakey(admin: Admin, alias: str, token: str) -> int:
    r = admin.call("POST", f"/v1/keys/{alias}/datakey", token, json={"context": {"t": "1"}})
    return int(r.status_code)


def _token_ids(admin: Admin, name: str) -> list[str]:
    r = admin.call("GET", f"/v1/principals/{name}/tokens")
    assert r.status_code == 200, r.text
    return [t["token_id"] for t in r.json()["tokens"]]


def _listed(admin: Admin, name: str) -> dict[str, Any]:
    r = admin.call("GET", "/v1/principals")
    assert r.status_code == 200, r.text
    (found,) = [p for p in r.json()["principals"] if p["name"] == name]
    return dict(found)


def _records(admin: Admin, operation: str, **filters: str) -> list[tuple[Any, ...]]:
    return [
        (r["principal"], r["outcome"], r["detail"])
        for r in admin.audit(operation=operation, **filters)
    ]


def test_admin_disables_and_enables_a_service_principal(
    server: Server, admin: Admin, page: Page
) -> None:
    svc, alias = _service(admin, "billing")
    assert _datakey(admin, alias, svc) == 200
    login(page, server, server.admin_token)
    page.get_by_role("link", name="Principals").click()
    expect(page).to_have_title(re.compile("^Principals"))
    row = page.locator("#principals tr[data-principal='billing']")
    expect(row.locator("[data-col=role]")).to_have_text("service")
    expect(row.locator("[data-col=state]")).to_have_text("enabled")
    expect(page.locator("#cli-hint")).to_contain_text("kms principals rotate-token")
    assert page.evaluate(A11Y_CHECK) == []
    shot(page, "principals")

    row.get_by_role("link", name="billing").click()
    expect(page).to_have_title(re.compile("^Principal billing"))
    expect(page.locator("#principal-state")).to_have_text("enabled")
    assert page.evaluate(A11Y_CHECK) == []
    shot(page, "principal")
    # disabling asks first; without the box ticked nothing changes
    page.get_by_role("button", name="Disable billing…").click()
    expect(page).to_have_title(re.compile("^Confirm disabling"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Disable billing?")
    assert page.evaluate(A11Y_CHECK) == []
    page.get_by_role("button", name="Disable billing", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("Tick the box to confirm")
    assert _datakey(admin, alias, svc) == 200
    assert _listed(admin, "billing")["state"] == "enabled"
    assert _records(admin, "disable_principal") == []
    shot(page, "confirm-disable")
    page.get_by_label(re.compile("^I understand")).check()
    page.get_by_role("button", name="Disable billing", exact=True).click()
    expect(page).to_have_title(re.compile("^Principal billing"))
    expect(page.get_by_role("status")).to_contain_text("Disabled billing")
    expect(page.locator("#principal-state")).to_contain_text("Disabled")

    # refused at once on the API (both workers), recorded against the admin
    for _ in range(4):
        assert _datakey(admin, alias, svc) == 401
    assert _listed(admin, "billing")["state"] == "disabled"
    assert _records(admin, "disable_principal") == [("admin", "ok", "name=billing")]
    page.get_by_role("link", name="Principals", exact=True).first.click()
    expect(
        page.locator("#principals tr[data-principal='billing'] [data-col=state]")
    ).to_contain_text("Disabled")

    page.locator("#principals").get_by_role("link", name="billing").click()
    page.get_by_role("button", name="Enable billing").click()
    expect(page.get_by_role("status")).to_contain_text("Enabled billing")
    expect(page.locator("#principal-state")).to_have_text("enabled")
    for _ in range(4):
        assert _datakey(admin, alias, svc) == 200
    assert _records(admin, "enable_principal") == [("admin", "ok", "name=billing")]
    # the page never showed the token
    assert svc not in page.content()


def test_admin_revokes_one_token(server: Server, admin: Admin, page: Page) -> None:
    first, alias = _service(admin, "ledger")
    issued = admin.call("POST", "/v1/principals/ledger/tokens", json={})
    assert issued.status_code == 201, issued.text
    second, second_id = issued.json()["token"], issued.json()["token_id"]
    first_id = next(t for t in _token_ids(admin, "ledger") if t != second_id)
    assert _datakey(admin, alias, first) == 200 and _datakey(admin, alias, second) == 200

    login(page, server, server.admin_token)
    page.goto(server.url + "/dashboard/principals/ledger")
    rows = page.locator("#tokens tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator(f"#tokens tr[data-token='{first_id}']")).to_be_visible()
    assert first not in page.content() and second not in page.content()

    page.get_by_role("button", name=f"Revoke… token {first_id}").click()
    expect(page).to_have_title(re.compile("^Confirm revocation"))
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Revoke token {first_id} of ledger?")
    assert page.evaluate(A11Y_CHECK) == []
    shot(page, "confirm-revoke")
    page.get_by_role("button", name=f"Revoke token {first_id}").click()
    expect(page.get_by_role("alert")).to_contain_text("Tick the box to confirm")
    assert _token_ids(admin, "ledger") == [first_id, second_id]
    page.get_by_label(re.compile("^I understand")).check()
    page.get_by_role("button", name=f"Revoke token {first_id}").click()
    expect(page.get_by_role("status")).to_contain_text(f"Revoked token {first_id} of ledger")

    # gone from the listing, refused on the API; the other token is untouched
    expect(rows).to_have_count(1)
    expect(page.locator(f"#tokens tr[data-token='{first_id}']")).to_have_count(0)
    expect(page.locator(f"#tokens tr[data-token='{second_id}']")).to_have_count(1)
    assert _token_ids(admin, "ledger") == [second_id]
    for _ in range(4):
        assert _datakey(admin, alias, first) == 401
        assert _datakey(admin, alias, second) == 200
    assert _records(admin, "revoke_token") == [("admin", "ok", f"name=ledger token={first_id}")]
    # revoking it again (a stale page): a clear error, nothing else changes
    answer = post_form(
        page,
        f"/dashboard/principals/ledger/tokens/{first_id}/revoke",
        server,
        {"csrf_token": csrf_of(page), "confirm": "yes", "step": "confirm"},
    )
    assert answer.status == 404 and "has no token" in answer.text()
    assert _token_ids(admin, "ledger") == [second_id]


def test_ended_and_disabled_sessions_go_back_to_the_login_page(
    server: Server, admin: Admin, page: Page, browser: Browser
) -> None:
    other_admin = admin.principal("erin", "admin")
    auditor = admin.principal("dora", "auditor")
    erin_ctx, dora_ctx = browser.new_context(), browser.new_context()
    try:
        erin, dora = erin_ctx.new_page(), dora_ctx.new_page()
        login(erin, server, other_admin)
        login(dora, server, auditor)
        for p in (erin, dora):
            expect(p).to_have_url(server.url + "/dashboard/")

        login(page, server, server.admin_token)
        page.goto(server.url + "/dashboard/principals/erin")
        expect(page.locator("#sessions-since")).to_have_text("never")
        page.get_by_role("button", name="End dashboard sessions of erin").click()
        expect(page.get_by_role("status")).to_contain_text("Ended the dashboard sessions of erin")
        expect(page.locator("#sessions-since")).not_to_have_text("never")
        assert _records(admin, "end_sessions") == [("admin", "ok", "name=erin")]
        assert _listed(admin, "erin")["sessions_since"] is not None

        # erin's next click lands on the login page; dora's session is untouched
        erin.get_by_role("link", name="Principals").click()
        expect(erin).to_have_url(server.url + "/dashboard/login")
        expect(erin.get_by_role("alert")).to_have_text(NO_LONGER_VALID)
        dora.get_by_role("link", name="Principals").click()
        expect(dora).to_have_title(re.compile("^Principals"))
        # erin's token still works: a new login is a new session
        login(erin, server, other_admin)
        expect(erin).to_have_url(server.url + "/dashboard/")
        assert admin.call("GET", "/v1/principals", other_admin).status_code == 200

        # disabling dora ends her session at her next click, and refuses a new login
        page.goto(server.url + "/dashboard/principals/dora")
        page.get_by_role("button", name="Disable dora…").click()
        page.get_by_label(re.compile("^I understand")).check()
        page.get_by_role("button", name="Disable dora", exact=True).click()
        expect(page.get_by_role("status")).to_contain_text("Disabled dora")
        dora.get_by_role("link", name="Overview").click()
        expect(dora).to_have_url(server.url + "/dashboard/login")
        expect(dora.get_by_role("alert")).to_have_text(NO_LONGER_VALID)
        with dora.expect_response(lambda r: r.request.method == "POST") as refused:
            login(dora, server, auditor)
        assert refused.value.status == 401
        expect(dora.get_by_role("alert")).to_have_text("That token is not valid.")
        assert _records(admin, "disable_principal", principal="admin")[-1] == (
            "admin",
            "ok",
            "name=dora",
        )
    finally:
        erin_ctx.close()
        dora_ctx.close()

    # an admin may end its own sessions, this one included
    page.goto(server.url + "/dashboard/principals/admin")
    page.get_by_role("button", name="End all my dashboard sessions, this one too").click()
    expect(page).to_have_url(server.url + "/dashboard/login")
    expect(page.get_by_role("alert")).to_have_text(NO_LONGER_VALID)
    assert _records(admin, "end_sessions")[-1] == ("admin", "ok", "name=admin")


def test_auditor_reads_but_may_not_act(server: Server, admin: Admin, page: Page) -> None:
    svc, alias = _service(admin, "reports")
    (token_id,) = _token_ids(admin, "reports")
    login(page, server, admin.principal("carol", "auditor"))
    page.get_by_role("link", name="Principals").click()
    expect(page.locator("#principals tr[data-principal='reports']")).to_be_visible()
    expect(page.locator("main form")).to_have_count(0)
    page.locator("#principals").get_by_role("link", name="reports").click()
    expect(page.locator(f"#tokens tr[data-token='{token_id}']")).to_be_visible()
    expect(page.locator("main form")).to_have_count(0)
    expect(page.locator("main button")).to_have_count(0)
    assert page.evaluate(A11Y_CHECK) == []
    page.goto(server.url + "/dashboard/principals/carol")
    expect(page.locator("main form")).to_have_count(0)  # not even for herself

    # the actions, posted by hand with a valid session and CSRF token: 403, nothing done
    csrf = csrf_of(page)
    confirmed = {"csrf_token": csrf, "confirm": "yes", "step": "confirm"}
    base = "/dashboard/principals"
    for path in (
        f"{base}/reports/disable",
        f"{base}/reports/enable",
        f"{base}/reports/tokens/{token_id}/revoke",
        f"{base}/reports/sessions/end",
        f"{base}/carol/sessions/end",  # the API would let her end her own; not here
    ):
        answer = post_form(page, path, server, confirmed)
        assert answer.status == 403, path
        assert "needs the role admin" in answer.text(), path
    assert _datakey(admin, alias, svc) == 200
    assert _token_ids(admin, "reports") == [token_id]
    reports = _listed(admin, "reports")
    assert (reports["state"], reports["sessions_since"]) == ("enabled", None)
    assert _listed(admin, "carol")["sessions_since"] is None
    refused = [(r["operation"], r["outcome"]) for r in admin.audit(principal="carol")]
    for op in ("disable_principal", "enable_principal", "revoke_token", "end_sessions"):
        assert (op, "forbidden") in refused, op
    assert not [r for r in refused if r[1] == "ok" and r[0] != "dashboard_login"]
    # her session lives on
    page.goto(server.url + "/dashboard/principals")
    expect(page).to_have_title(re.compile("^Principals"))


def test_actions_without_the_csrf_token_are_refused_and_change_nothing(
    server: Server, admin: Admin, page: Page
) -> None:
    svc, alias = _service(admin, "payroll")
    (token_id,) = _token_ids(admin, "payroll")
    login(page, server, server.admin_token)
    page.goto(server.url + "/dashboard/principals/payroll")
    # in the browser: the disable form, its token forged, then removed
    disable_form = "form:has(button:text('Disable payroll…')) input[name=csrf_token]"
    for tamper in ("e => { e.value = 'forged-' + e.value }", "e => e.remove()"):
        page.goto(server.url + "/dashboard/principals/payroll")
        page.locator(disable_form).evaluate(tamper)
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.get_by_role("button", name="Disable payroll…").click()
        assert answer.value.status == 400
        expect(page.locator("#error-message")).to_have_text(
            "invalid or missing CSRF token; nothing was changed"
        )
    # by hand, every action confirmed, with a wrong token and with none
    base = "/dashboard/principals/payroll"
    paths = {
        f"{base}/disable": "disable_principal",
        f"{base}/enable": "enable_principal",
        f"{base}/tokens/{token_id}/revoke": "revoke_token",
        f"{base}/sessions/end": "end_sessions",
    }
    for path in paths:
        for fields in (
            {"csrf_token": "forged", "confirm": "yes", "step": "confirm"},
            {"confirm": "yes", "step": "confirm"},
        ):
            answer = post_form(page, path, server, fields)
            assert answer.status == 400, path
            assert "invalid or missing CSRF token" in answer.text()
    assert _datakey(admin, alias, svc) == 200
    assert _token_ids(admin, "payroll") == [token_id]
    payroll = _listed(admin, "payroll")
    assert (payroll["state"], payroll["sessions_since"]) == ("enabled", None)
    for op in paths.values():
        assert [r for r in _records(admin, op, outcome="ok") if "payroll" in r[2]] == []
    # each refusal is recorded against the session's principal, with the reason
    refused = [
        (r["principal"], r["operation"], r["detail"]) for r in admin.audit(outcome="csrf_invalid")
    ]
    assert refused == [
        ("admin", "disable_principal", "mismatch"),
        ("admin", "disable_principal", "missing"),
        *[("admin", op, why) for op in paths.values() for why in ("mismatch", "missing")],
    ]
    # the session itself is fine
    page.goto(server.url + "/dashboard/principals/payroll")
    expect(page).to_have_title(re.compile("^Principal payroll"))

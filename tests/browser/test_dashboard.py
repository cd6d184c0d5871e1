"""The ops dashboard in a real browser against a live server: an overdue rotation is
flagged and fixed, a version is retired behind a confirmation, the refused decrypt of a
retired version shows in the audit view, "verify now" checks the live chain, open escrow
cases are listed with their seal status."""

from __future__ import annotations

import re
import sqlite3

import pytest
from playwright.sync_api import Page, expect

from tests.browser.support import Admin, age_key, login, shot
from tests.helpers import Server

pytestmark = pytest.mark.e2e


def test_overdue_rotation_rotate_retire_and_refused_decrypt_in_audit_view(
    server: Server, admin: Admin, page: Page
) -> None:
    svc = admin.principal("app", "service")
    patients = admin.key("patients", grant_to="app")
    admin.key("billing")
    admin.key("archive-2019")
    for alias, days in (("patients", 1), ("billing", 90), ("archive-2019", 30)):
        r = admin.call("POST", f"/v1/keys/{alias}/config", json={"rotation_period_days": days})
        assert r.status_code == 200, r.text
    # a blob under version 1, opened three times
    context = {"record": "p-17"}
    old = admin.call("POST", "/v1/keys/patients/datakey", svc, json={"context": context}).json()
    for _ in range(3):
        r = admin.call(
            "POST", "/v1/decrypt", svc, json={"ciphertext": old["ciphertext"], "context": context}
        )
        assert r.status_code == 200, r.text
    # the current versions of patients and archive-2019 were made 2 and 45 days ago
    age_key(server, patients["key_id"], days=2)
    age_key(server, admin.describe("archive-2019")["key_id"], days=45)

    page.goto(server.url + "/dashboard/")
    expect(page).to_have_url(server.url + "/dashboard/login")  # no session: log in first
    expect(page).to_have_title(re.compile("^Log in"))
    shot(page, "login")
    login(page, server, server.admin_token)
    expect(page).to_have_url(server.url + "/dashboard/")

    row = page.locator("#keys tr[data-key='patients']")
    expect(row.locator("[data-col=rotation]")).to_have_text("Overdue")
    expect(row).to_have_class("overdue")
    expect(row.locator("[data-col=version]")).to_have_text("1")
    expect(page.locator("#keys tr[data-key='billing'] [data-col=rotation]")).to_have_text(
        "on schedule"
    )
    expect(page.locator("#keys-summary")).to_contain_text("2 overdue for rotation")
    shot(page, "overview-overdue")

    row.get_by_role("link", name="patients").click()
    expect(page).to_have_title(re.compile("^Key patients"))
    expect(page.locator("#current-version")).to_have_text("1")
    expect(page.locator("#rotation-status")).to_contain_text("Overdue")
    page.get_by_role("button", name="Rotate now").click()
    expect(page.get_by_role("status")).to_contain_text("version 2 is current")
    expect(page.locator("#current-version")).to_have_text("2")
    expect(page.locator("#rotation-status")).not_to_contain_text("Overdue")
    assert admin.describe("patients")["current_version"] == 2

    # version 2 in use too (a fresh page load shows it)
    new = admin.call("POST", "/v1/keys/patients/datakey", svc, json={"context": context}).json()
    for _ in range(2):
        r = admin.call(
            "POST", "/v1/decrypt", svc, json={"ciphertext": new["ciphertext"], "context": context}
        )
        assert r.status_code == 200, r.text

    # retiring version 1 needs a confirmation; without the box ticked nothing changes
    page.reload()
    page.get_by_label("Retire all versions up to").fill("1")
    page.get_by_role("button", name="Retire…").click()
    expect(page).to_have_title(re.compile("^Confirm retirement"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Retire version 1 of patients?")
    page.get_by_role("button", name="Retire versions up to 1").click()
    expect(page.get_by_role("alert")).to_contain_text("Tick the box to confirm")
    assert admin.describe("patients")["min_decryption_version"] == 1
    shot(page, "confirm-retire")
    page.get_by_label(re.compile("^I understand")).check()
    page.get_by_role("button", name="Retire versions up to 1").click()
    expect(page.get_by_role("status")).to_contain_text("Retired versions up to 1 of patients")
    assert admin.describe("patients")["min_decryption_version"] == 2
    v1 = page.locator("#versions tr[data-version='1']")
    expect(v1.locator("[data-col=status]")).to_contain_text("Retired")
    expect(v1.locator("td.num")).to_have_text("3")  # its three decrypts
    expect(page.locator("#versions tr[data-version='2'] [data-col=status]")).to_have_text("current")
    # the usage chart: today's column stacks version 1 (3) under version 2 (2)
    expect(page.locator("figure.chart rect.series-1 title")).to_have_text(
        re.compile(r"version 1, 3 decrypts$")
    )
    expect(page.locator("figure.chart rect.series-2 title")).to_have_text(
        re.compile(r"version 2, 2 decrypts$")
    )
    expect(page.locator("#chart-desc")).to_have_text(
        "5 decrypts in total; version 1: 3; version 2: 2."
    )
    shot(page, "key-detail")

    # the blob under version 1 is refused now...
    r = admin.call(
        "POST", "/v1/decrypt", svc, json={"ciphertext": old["ciphertext"], "context": context}
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "key_version_retired"
    (refusal,) = admin.audit(key_id=patients["key_id"], outcome="key_version_retired")
    # ...and the dashboard's audit view shows that refusal, marked as such
    page.get_by_role("link", name="Audit records of this key").click()
    page.get_by_label("Outcome").fill("refused")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_title(re.compile("^Audit records"))
    shown = page.locator(f"#records tr[data-seq='{refusal['seq']}']")
    expect(shown).to_have_class("refused")
    expect(shown).to_contain_text("decrypt")
    expect(shown.locator("[data-col=outcome]")).to_have_text(
        re.compile(r"Refused\s+key_version_retired")
    )
    # only refusals of this key are listed, newest first
    seqs = [
        int(s)
        for s in page.locator("#records tbody tr").evaluate_all("rs => rs.map(r => r.dataset.seq)")
    ]
    assert seqs == sorted(seqs, reverse=True) and refusal["seq"] in seqs
    expect(page.locator("#records tbody tr:not(.refused)")).to_have_count(0)
    shot(page, "audit-refused")

    # a signed checkpoint, then "verify now" from the overview
    assert admin.call("POST", "/v1/audit/checkpoints", json={}).status_code == 201
    page.get_by_role("link", name="Overview").click()
    expect(page.locator("#audit-status")).to_contain_text("Last signed checkpoint")
    expect(page.locator("#last-verification")).to_contain_text("never")
    page.get_by_role("button", name="Verify now").click()
    expect(page.get_by_role("status")).to_contain_text("Audit chain verified")
    expect(page.locator("#last-verification")).to_contain_text("Verified")
    expect(page.locator("#keys tr[data-key='patients'] [data-col=rotation]")).to_have_text(
        "on schedule"
    )
    verified = admin.audit(operation="verify_audit")
    assert [(v["principal"], v["outcome"]) for v in verified] == [("admin", "ok")]
    logins = admin.audit(operation="dashboard_login")
    assert [(x["principal"], x["outcome"]) for x in logins] == [("admin", "ok")]
    # what the browser did is attributed to the admin in the trail
    rotations = admin.audit(key_id=patients["key_id"], operation="rotate_key")
    assert [(x["principal"], x["key_version"]) for x in rotations] == [("admin", 2)]
    # no bearer token reached the server's logs
    log = server.log_text()
    assert server.admin_token not in log and svc not in log


def test_verification_failure_is_shown_and_recorded(
    server: Server, admin: Admin, page: Page
) -> None:
    """An audit record edited in the database: "verify now" says FAILED and where."""
    admin.key("ledger")
    assert admin.call("POST", "/v1/audit/checkpoints", json={}).status_code == 201
    (record,) = admin.audit(operation="create_key", key_id=admin.describe("ledger")["key_id"])
    db = sqlite3.connect(server.data_dir / "kms.sqlite3")
    with db:
        db.execute(
            "UPDATE audit_records SET principal = 'someone-else' WHERE seq = ?", (record["seq"],)
        )
    db.close()
    try:
        login(page, server, server.admin_token)
        page.get_by_role("button", name="Verify now").click()
        expect(page.get_by_role("alert")).to_contain_text("Audit verification FAILED")
        expect(page.get_by_role("alert")).to_contain_text(f"seq {record['seq']}")
        expect(page.locator("#last-verification")).to_contain_text("Failed")
        last = admin.audit(operation="verify_audit")[-1]
        assert last["outcome"] == "audit_verification_failed"
        assert f"seq {record['seq']}" in last["detail"]
    finally:
        db = sqlite3.connect(server.data_dir / "kms.sqlite3")
        with db:
            db.execute(
                "UPDATE audit_records SET principal = 'admin' WHERE seq = ?", (record["seq"],)
            )
        db.close()
    # the record restored, the chain verifies again
    page.get_by_role("button", name="Verify now").click()
    expect(page.get_by_role("status")).to_contain_text("Audit chain verified")
    assert admin.audit(operation="verify_audit")[-1]["outcome"] == "ok"


def test_open_escrow_cases_are_listed_and_an_altered_case_row_is_flagged(
    server: Server, admin: Admin, page: Page
) -> None:
    admin.key("records")
    police = admin.principal("police", "requester")
    case_body = {
        "legal_basis": "Court order 2026/117",
        "reference": "INV-117",
        "justification": "legal_request",
        "scope": {"keys": ["records"]},
        "max_unwraps": 1,
        "expires_in_seconds": 3600,
    }
    filed = [
        admin.call("POST", "/v1/escrow/cases", police, json=case_body).json() for _ in range(2)
    ]
    assert all("case_id" in c for c in filed), filed
    closed = filed[1]["case_id"]
    assert (
        admin.call("POST", f"/v1/escrow/cases/{closed}/close", police, json={}).status_code == 200
    )
    login(page, server, server.admin_token)
    cases = page.locator("#cases tbody tr")
    expect(cases).to_have_count(1)  # the closed case is not open
    expect(cases.first).to_contain_text(filed[0]["case_id"])
    expect(cases.first).to_contain_text("pending")
    expect(cases.first).to_contain_text("police")
    expect(cases.first).not_to_contain_text("Seal broken")
    shot(page, "overview")
    # the state edited in the database: the row no longer matches its HSM seal
    db = sqlite3.connect(server.data_dir / "kms.sqlite3")
    with db:
        db.execute(
            "UPDATE escrow_cases SET unwraps_used = 0, state = 'approved' WHERE case_id = ?",
            (filed[0]["case_id"],),
        )
    db.close()
    page.reload()
    expect(cases.first).to_contain_text("approved")
    expect(cases.first).to_contain_text("Seal broken")

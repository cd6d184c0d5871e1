"""The dashboard's dual-control pages in a real browser against live servers: under dual
control (a data directory from the real ``kms init`` with three custodians pinned, no
--single-operator) an admin proposes a service principal from the Principals page, sees
the pending change, custodians approve it offline (Ed25519 over the digest recomputed
here, submitted with their own tokens), and the admin applies it from the dashboard and
sees the new token once. Only the proposer applies; any admin cancels; auditors read;
forms need their CSRF token; what an admin proposed is shown as text to whoever reads
it. A single-operator server shows its mode on every page."""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.sync_api import Browser, Dialog, Page, expect

from kms.formats import change as changefmt
from kms.formats import escrow as escrowfmt
from tests.browser.support import SERVER_ENV, Admin, csrf_of, login, post_form, shot
from tests.browser.test_dashboard_security import A11Y_CHECK
from tests.helpers import Server, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e
CUSTODIANS = (("officer", "keyholder"), ("dpo", "data_owner"), ("counsel", "legal"))
BANNER = (
    "Single-operator mode: control-plane changes take effect without approvals (development only)"
)
PROPOSED = "Change proposed, awaiting approvals"
HOSTILE = ("<script>alert(1)</script>", '"><img/src=x/onerror=alert(2)>')  # no space in XKS


@dataclasses.dataclass
class Dual:
    """A server under dual control, its admin API and its custodians' keys."""

    server: Server
    admin: Admin
    keys: dict[str, Ed25519PrivateKey]

    def custodian_token(self, name: str) -> str:
        return (self.server.data_dir / f"custodian-{name}.token").read_text().strip()

    def change(self, change_id: str) -> dict[str, Any]:
        r = self.admin.call("GET", f"/v1/changes/{change_id}")
        assert r.status_code == 200, r.text
        return dict(r.json()["change"])

    def sign(self, change_id: str, who: str, decision: str = "approve") -> Any:
        """``who`` signs the change as its custodian does offline: the digest recomputed
        from the fields the server shows (to that custodian), with its own key."""
        token = self.custodian_token(who)
        shown = self.admin.call("GET", f"/v1/changes/{change_id}", token)
        assert shown.status_code == 200, shown.text
        digest = changefmt.change_digest(shown.json()["change"])
        signature = self.keys[who].sign(escrowfmt.signed_message(digest, decision))
        body = {"custodian": who, "signature": base64.b64encode(signature).decode()}
        return self.admin.call("POST", f"/v1/changes/{change_id}/{decision}", token, json=body)

    def approve(self, change_id: str, who: tuple[str, ...] = ("officer", "dpo")) -> None:
        for name in who:
            r = self.sign(change_id, name)
            assert r.status_code == 200, r.text

    def propose(self, path: str, body: dict[str, Any], token: str | None = None) -> str:
        """A gated request through the API; the pending change's id."""
        r = self.admin.call("POST", path, token, json=body)
        assert r.status_code == 202, r.text
        return str(r.json()["change"]["change_id"])

    def names(self) -> set[str]:
        r = self.admin.call("GET", "/v1/principals")
        assert r.status_code == 200, r.text
        return {p["name"] for p in r.json()["principals"]}


def _public(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def dual(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dual]:
    """``kms init`` without --single-operator, custodians pinned with --custodian, the
    policy's groups from KMS_CHANGE_REQUIRED_GROUPS at that first init."""
    data: Path = tmp_path_factory.mktemp("dual-data")
    keys = {name: Ed25519PrivateKey.generate() for name, _ in CUSTODIANS}
    pins = [f"--custodian={n}:{g}:{_public(keys[n])}" for n, g in CUSTODIANS]
    done = run_kms(
        "init",
        "--data-dir",
        str(data),
        *pins,
        env={"KMS_CHANGE_REQUIRED_GROUPS": "keyholder,data_owner"},
    )
    assert done.returncode == 0, done.stderr
    assert "mode=dual" in done.stdout, done.stdout
    with gunicorn_server(data, workers=2, env=SERVER_ENV) as srv:
        yield Dual(srv, Admin(srv), keys)


def _no_dialogs(page: Page) -> list[str]:
    """Collects the messages of any dialog the page opens (an injected script would)."""
    opened: list[str] = []

    def seen(dialog: Dialog) -> None:
        opened.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", seen)
    return opened


def test_admin_proposes_custodians_approve_admin_applies_and_sees_the_token_once(
    dual: Dual, page: Page
) -> None:
    server, admin = dual.server, dual.admin
    login(page, server, server.admin_token)
    expect(page.locator("#control-banner")).to_have_count(0)  # dual control: no banner
    page.get_by_role("link", name="Principals").click()
    page.get_by_label("Name").fill("billing")
    page.get_by_label("Role").select_option("service")
    page.get_by_role("button", name="Create principal").click()

    # not created: proposed, and the browser is on the pending change
    expect(page.get_by_role("status")).to_contain_text(
        f"{PROPOSED}: create service principal billing"
    )
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Change: create service principal billing"
    )
    change_id = page.locator("#change-id").inner_text()
    expect(page).to_have_url(f"{server.url}/dashboard/changes/{change_id}")
    expect(page.locator("#change-state")).to_have_text("pending, awaiting approvals")
    expect(page.locator("#change-proposer")).to_have_text("admin")
    expect(page.locator("#change-groups")).to_have_text("data_owner, keyholder")
    expect(page.locator("#change-approvals")).to_have_text("none (0 of 2)")
    expect(page.locator("#params tr[data-param='name'] td")).to_have_text("billing")
    expect(page.locator("#params tr[data-param='role'] td")).to_have_text("service")
    expect(page.locator("#approve-command")).to_have_text(
        f"kms changes approve {change_id} --key <file> --custodian <name>"
    )
    shown = dual.change(change_id)
    expect(page.locator("#change-digest")).to_have_text(shown["digest"])
    assert shown["digest"] == changefmt.change_digest(shown).hex()
    expect(page.locator("#params-json")).to_have_text(changefmt.canonical(shown["params"]))
    expect(page.get_by_role("button", name="Apply change")).to_have_count(0)
    expect(page.locator("#apply-hint")).to_be_visible()
    assert page.evaluate(A11Y_CHECK) == []
    shot(page, "change-pending")
    assert shown["state"] == "pending" and shown["proposer"] == "admin"
    assert "billing" not in dual.names()

    # the Changes page lists it first, with the policy in force
    page.get_by_role("navigation").get_by_role("link", name="Changes").click()
    expect(page).to_have_title(re.compile("^Changes"))
    row = page.locator(f"#pending tr[data-change='{change_id}']")
    expect(row.get_by_role("link")).to_have_text("create service principal billing")
    expect(row.locator("[data-col=proposer]")).to_have_text("admin")
    expect(row.locator("[data-col=approved]")).to_have_text("not yet")
    expect(page.locator("#control-mode")).to_contain_text("dual control")
    expect(page.locator("#control-quorum")).to_contain_text("2 approvals")
    expect(page.locator("#control-groups")).to_contain_text("data_owner, keyholder")
    expect(page.locator("#control-ttl")).to_have_text("7 d 0 h after it is proposed")
    assert page.evaluate(A11Y_CHECK) == []
    shot(page, "changes")

    # one approval is not the quorum; a second (the other needed group) is
    dual.approve(change_id, ("officer",))
    page.reload()
    expect(row.locator("[data-col=approvals]")).to_have_text("officer (1 of 2)")
    dual.approve(change_id, ("dpo",))
    page.reload()
    expect(row.locator("[data-col=approved]")).to_have_text("Approved")
    row.get_by_role("link").click()
    expect(page.locator("#change-state")).to_contain_text("Approved")

    # apply: the token is on the answer to the POST, and nowhere afterwards
    page.get_by_role("button", name="Apply change").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Applied: create service principal billing"
    )
    expect(page.locator("[data-field=name]")).to_have_text("billing")
    expect(page.locator("#secret-warning-1")).to_contain_text("Shown only this once")
    token = page.locator("#secret-token").inner_text().strip()
    assert token.startswith("kms_")
    assert page.evaluate(A11Y_CHECK) == []
    shot(page, "change-applied")
    assert "billing" in dual.names()
    admin.key("billing-key")
    # the token authenticates (403: a service with no grant yet; an unknown token is 401)
    enc = {"plaintext": "aGk="}
    assert admin.call("POST", "/v1/keys/billing-key/encrypt", token, json=enc).status_code == 403
    bogus = admin.call("POST", "/v1/keys/billing-key/encrypt", token + "x", json=enc)
    assert bogus.status_code == 401

    page.get_by_role("link", name="Back to the change").click()
    expect(page.locator("#change-state")).to_have_text("applied")
    expect(page.locator("main form")).to_have_count(0)
    assert token not in page.content()
    page.get_by_role("navigation").get_by_role("link", name="Changes").click()
    expect(page.locator(f"#others tr[data-change='{change_id}'] [data-col=state]")).to_have_text(
        "applied"
    )
    assert token not in page.content()
    assert dual.change(change_id)["state"] == "applied"
    # applied once: a second POST (a stale page, a reload) is refused, nothing issued
    again = post_form(
        page, f"/dashboard/changes/{change_id}/apply", server, {"csrf_token": csrf_of(page)}
    )
    assert again.status == 409 and "the change is applied" in again.text()
    records = [(r["principal"], r["operation"], r["outcome"]) for r in admin.audit()]
    for op in ("propose_change", "apply_change", "create_principal"):
        assert ("admin", op, "ok") in records, op
    assert token not in server.log_text()


def test_only_the_proposer_applies_any_admin_cancels_auditors_read(
    dual: Dual, page: Page, browser: Browser
) -> None:
    server, admin = dual.server, dual.admin
    # a second admin, itself through dual control (API), and an auditor (not gated)
    made = dual.propose("/v1/principals", {"name": "admin2", "role": "admin"})
    dual.approve(made)
    applied = admin.call("POST", f"/v1/changes/{made}/apply", json={})
    assert applied.status_code == 201, applied.text
    admin2 = applied.json()["token"]
    auditor = admin.principal("aud", "auditor")

    change_id = dual.propose("/v1/principals", {"name": "ledger", "role": "service"})
    dual.approve(change_id)
    path = f"/dashboard/changes/{change_id}"
    other = browser.new_context()
    try:
        for token, role in ((admin2, "admin2"), (auditor, "auditor")):
            p = other.new_page()
            login(p, server, token)
            p.goto(server.url + path)
            expect(p.locator("#change-state")).to_contain_text("Approved")
            expect(p.get_by_role("button", name="Apply change")).to_have_count(0)
            answer = post_form(p, f"{path}/apply", server, {"csrf_token": csrf_of(p)})
            expected = "only the proposer applies" if role == "admin2" else "needs the role admin"
            assert answer.status == 403 and expected in answer.text(), role
            if role == "auditor":
                expect(p.locator("main form")).to_have_count(0)
                cancel = post_form(p, f"{path}/cancel", server, {"csrf_token": csrf_of(p)})
                assert cancel.status == 403
            p.close()
            other.clear_cookies()
    finally:
        other.close()
    assert dual.change(change_id)["state"] == "pending"
    assert "ledger" not in dual.names()

    # the proposer, without the form's CSRF token: refused, nothing applied
    login(page, server, server.admin_token)
    page.goto(server.url + path)
    forged = post_form(page, f"{path}/apply", server, {"csrf_token": "forged"})
    assert forged.status == 400 and "CSRF" in forged.text()
    forged = post_form(page, f"{path}/cancel", server, {})
    assert forged.status == 400
    assert dual.change(change_id)["state"] == "pending"

    # any admin cancels (here the proposer): it can no longer be applied
    page.get_by_role("button", name="Cancel change").click()
    expect(page.get_by_role("status")).to_contain_text(
        "Cancelled the change: create service principal ledger"
    )
    expect(page.locator("#change-state")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Apply change")).to_have_count(0)
    assert dual.change(change_id)["state"] == "cancelled"
    assert admin.call("POST", f"/v1/changes/{change_id}/apply", json={}).status_code == 409
    assert "ledger" not in dual.names()
    cancels = [(r["principal"], r["outcome"]) for r in admin.audit(operation="cancel_change")]
    assert ("admin", "ok") in cancels and ("aud", "forbidden") in cancels


def test_what_an_admin_proposed_is_shown_as_text(dual: Dual, page: Page) -> None:
    admin = dual.admin
    key = admin.key("hostile")
    body = {"usage": ["encrypt"], "aws_principals": list(HOSTILE)}
    change_id = dual.propose("/v1/keys/hostile/xks", body)
    # a grant to a principal that does not exist is refused before it is recorded
    grantee = "<b id=bold>x</b><script>alert(3)</script>"
    body = {"principal": grantee, "operations": ["decrypt"]}
    refused = admin.call("POST", "/v1/keys/hostile/grants", json=body)
    assert refused.status_code == 400, refused.text
    dialogs = _no_dialogs(page)
    login(page, dual.server, dual.server.admin_token)
    page.goto(dual.server.url + "/dashboard/changes")
    row = page.locator(f"#pending tr[data-change='{change_id}']")
    expect(row.get_by_role("link")).to_contain_text(HOSTILE[0])
    expect(row.get_by_role("link")).to_contain_text(HOSTILE[1])
    row.get_by_role("link").click()
    expect(page.locator("#params tr[data-param='aws_principals'] td")).to_have_text(
        ", ".join(HOSTILE)
    )
    expect(page.locator("#params tr[data-param='key'] td")).to_have_text(key["key_id"])
    expect(page.locator("h1")).to_contain_text(HOSTILE[0])
    html = page.content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img/src=x/onerror=alert(2)&gt;" in html
    counts = page.evaluate(
        "() => [document.querySelectorAll('script').length, "
        "document.querySelectorAll('img').length]"
    )
    assert counts == [0, 0] and dialogs == []
    # and the digest covers exactly what is shown
    assert dual.change(change_id)["params"]["aws_principals"] == list(HOSTILE)
    shot(page, "change-hostile-params")

    # approved and applied from the dashboard: no secret, so back to the change's page
    dual.approve(change_id)
    page.reload()
    page.get_by_role("button", name="Apply change").click()
    expect(page.get_by_role("status")).to_contain_text("Applied: set the XKS policy of key")
    expect(page.get_by_role("status")).to_contain_text(HOSTILE[1])
    expect(page.locator("#change-state")).to_have_text("applied")
    counts = page.evaluate(
        "() => [document.querySelectorAll('script').length, "
        "document.querySelectorAll('img').length]"
    )
    assert counts == [0, 0] and dialogs == []
    policy = dual.admin.call("GET", "/v1/keys/hostile/xks")
    assert policy.status_code == 200 and policy.json()["aws_principals"] == list(HOSTILE)


def test_single_operator_mode_is_on_every_page(server: Server, admin: Admin, page: Page) -> None:
    page.goto(server.url + "/dashboard/login")
    expect(page.locator("#control-banner")).to_have_text(BANNER)
    login(page, server, server.admin_token)
    pages = ("/dashboard/", "/dashboard/audit", "/dashboard/principals", "/dashboard/keys/nope")
    for path in pages:
        page.goto(server.url + path)
        expect(page.locator("#control-banner")).to_have_text(BANNER)
    page.goto(server.url + "/dashboard/changes")
    expect(page.locator("#control-banner")).to_have_text(BANNER)
    expect(page.locator("#control-mode")).to_contain_text("Single-operator")
    expect(page.locator("#pending-summary")).to_contain_text("0 pending changes")
    assert page.evaluate(A11Y_CHECK) == []
    shot(page, "changes-single-operator")

    # a gated action takes effect at once: the token is shown on the answer, once
    page.get_by_role("link", name="Principals").click()
    page.get_by_label("Name").fill("quick")
    page.get_by_label("Role").select_option("service")
    page.get_by_role("button", name="Create principal").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Created service principal quick")
    expect(page.locator("#control-banner")).to_have_text(BANNER)
    token = page.locator("#secret-token").inner_text().strip()
    admin.key("quick-key")
    r = admin.call("POST", "/v1/keys/quick-key/encrypt", token, json={"plaintext": "aGk="})
    assert r.status_code == 403  # authenticated; no grant
    page.get_by_role("link", name="Principal quick").click()
    assert token not in page.content()
    assert admin.call("GET", "/v1/changes").json()["changes"] == []

"""Helpers of the browser tests: screenshots, logging in, the bearer-token API beside the
browser, and set-up steps on the server's database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from playwright.sync_api import Page

from tests.helpers import ROOT, Server, update_keys

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
# No scheduler pass during a test: an overdue key must stay overdue until we rotate it.
SERVER_ENV = {"KMS_SCHEDULER_SECONDS": "0"}


def shot(page: Page, name: str) -> Path:
    """A full-page PNG of what the browser shows now, under artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def login(page: Page, server: Server, token: str) -> None:
    page.goto(server.url + "/dashboard/login")
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Log in").click()


class Admin:
    """The bearer-token API, as the admin (set-up steps and checks beside the browser)."""

    def __init__(self, server: Server) -> None:
        self.url = server.url
        self.headers = {"Authorization": f"Bearer {server.admin_token}"}

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else self.headers
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def principal(self, name: str, role: str) -> str:
        r = self.call("POST", "/v1/principals", json={"name": name, "role": role})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def key(self, alias: str, grant_to: str | None = None) -> dict[str, Any]:
        r = self.call("POST", "/v1/keys", json={"alias": alias})
        assert r.status_code == 201, r.text
        if grant_to:
            g = self.call(
                "POST",
                f"/v1/keys/{alias}/grants",
                json={"principal": grant_to, "operations": ["datakey", "decrypt"]},
            )
            assert g.status_code == 200, g.text
        return dict(r.json())

    def describe(self, ref: str) -> dict[str, Any]:
        r = self.call("GET", f"/v1/keys/{ref}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def audit(self, **filters: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            params = {"after": out[-1]["seq"] if out else 0, "limit": 1000, **filters}
            r = self.call("GET", "/v1/audit", params=params)
            assert r.status_code == 200, r.text
            if not r.json()["records"]:
                return out
            out.extend(r.json()["records"])


def age_key(server: Server, key_id: str, days: float) -> None:
    """Test set-up: pretend the key's current version was made ``days`` ago (its
    rotated_at, the same field a rotation writes, sealed as the server would)."""
    update_keys(server.data_dir, key_id, rotated_at=datetime.now(UTC) - timedelta(days=days))


def csrf_of(page: Page) -> str:
    """The session's CSRF token, as the page's forms carry it."""
    return str(page.locator("input[name=csrf_token]").first.get_attribute("value"))


def post_form(page: Page, path: str, server: Server, fields: dict[str, str]) -> Any:
    """POST a form with the browser's cookies (what a hand-made or hostile form would
    send), returning the APIResponse."""
    return page.request.post(server.url + path, form=fields, max_redirects=0)

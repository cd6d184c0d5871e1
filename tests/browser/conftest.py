"""Browser tests: Playwright driving Debian's headless Chromium against real gunicorn
servers (2 workers, a real SoftHSM token each). Screenshots of the main pages are saved
to artifacts/screenshots/ at the repository root."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from tests.browser.support import CHROMIUM, SERVER_ENV, Admin
from tests.helpers import SECRET, Receiver, Server, gunicorn_server, init_data_dir


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is missing: run `make system-deps` (apt-get install chromium)"
        )
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
    yield browser
    browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """The data owner's webhook endpoint (escrow runs only with one)."""
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Server]:
    data = init_data_dir(tmp_path_factory.mktemp("dashboard-data"))
    secret = data / "webhook.secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # as the server requires
    env = {
        **SERVER_ENV,
        "KMS_ESCROW_WEBHOOK_URL": receiver.url,
        "KMS_ESCROW_WEBHOOK_SECRET_FILE": str(secret),
        "KMS_ESCROW_REQUIRED_GROUPS": "keyholder,data_owner",
    }
    with gunicorn_server(data, workers=2, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server: Server) -> Admin:
    return Admin(server)

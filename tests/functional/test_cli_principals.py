"""The principal lifecycle commands of the real ``kms`` CLI (``kms principals disable``,
``enable``, ``end-sessions``, ``tokens``, ``issue-token``, ``rotate-token``,
``revoke-token``) and the SDK methods under them, against a real gunicorn server (two
workers, the default authentication cache) on a real SoftHSM token: each command's effect
is checked on the API (a revoked, rotated-out or disabled principal's token gets 401 from
every worker at once), and bad input gets one clear line and a non-zero exit, never a
traceback."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests

from kms.client import KmsClient, KmsClientError
from tests.helpers import Server, gunicorn_server, init_data_dir, run_kms

pytestmark = pytest.mark.e2e

KEY = "cli-lifecycle"  # a key every service principal of the module is granted
SERVICE_CAP = timedelta(days=90)
ENV = {
    "KMS_TOKEN_MAX_LIFETIME": "service=90d",
    "KMS_DASHBOARD_SECURE_COOKIE": "0",  # the dashboard over loopback http
    "KMS_SCHEDULER_SECONDS": "0",
}
TRIES = 6  # requests per check, so that both workers answer (each keeps its own cache)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = init_data_dir(tmp_path_factory.mktemp("cli-principals"))
    with gunicorn_server(data, workers=2, env=ENV) as srv:
        srv.kms("keys", "create", "--alias", KEY)
        yield srv


_names = iter(range(10**6))


def _kms_json(server: Server, *args: str) -> Any:
    """``kms ARGS`` as the admin: it must succeed, print JSON on stdout and nothing on
    stderr."""
    done = run_kms(*args, env=server.admin_env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return json.loads(done.stdout)


def _service(server: Server) -> tuple[str, str]:
    """A new service principal granted datakey on KEY: its name and token."""
    name = f"svc-{next(_names)}"
    token = _kms_json(server, "principals", "create", name, "--role", "service")["token"]
    _kms_json(server, "grants", "set", KEY, "--principal", name, "--operations", "datakey")
    return name, token


def _statuses(server: Server, token: str) -> set[int]:
    """The statuses of TRIES datakey calls with ``token`` (fresh connections: both
    workers answer some, each from its cache once it has seen the token)."""
    found = set()
    for _ in range(TRIES):
        r = requests.post(
            f"{server.url}/v1/keys/{KEY}/datakey",
            json={},
            headers={"Authorization": f"Bearer {token}", "Connection": "close"},
            timeout=30,
        )
        found.add(r.status_code)
    return found


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _ids(server: Server, name: str) -> list[str]:
    return [t["token_id"] for t in _kms_json(server, "principals", "tokens", name)]


# -- the commands' effects ------------------------------------------------------------------


def test_issue_token_prints_it_once_and_caps_it_by_role(server: Server) -> None:
    name, first = _service(server)
    done = run_kms("principals", "issue-token", name, "--ttl", "3600", env=server.admin_env)
    assert done.returncode == 0, done.stderr
    issued = json.loads(done.stdout)
    token = issued["token"]
    assert done.stdout.count(token) == 1 and token not in done.stderr
    assert issued["token_id"] == _token_id(token) and issued["last_used_at"] is None
    lifetime = _when(issued["expires_at"]) - _when(issued["created_at"])
    assert lifetime == timedelta(seconds=3600)
    assert _statuses(server, token) == {200} and _statuses(server, first) == {200}

    longer = _kms_json(server, "principals", "issue-token", name, "--ttl", str(200 * 86400))
    assert _when(longer["expires_at"]) - _when(longer["created_at"]) == SERVICE_CAP
    default = _kms_json(server, "principals", "issue-token", name)
    assert _when(default["expires_at"]) - _when(default["created_at"]) == SERVICE_CAP

    listing = run_kms("principals", "tokens", name, env=server.admin_env)
    assert listing.returncode == 0, listing.stderr
    assert "kms_" not in listing.stdout  # ids only, never a token
    tokens = json.loads(listing.stdout)
    assert [t["token_id"] for t in tokens] == [
        _token_id(first),
        issued["token_id"],
        longer["token_id"],
        default["token_id"],
    ]
    assert {tuple(sorted(t)) for t in tokens} == {
        ("created_at", "expires_at", "last_used_at", "token_id")
    }
    used = next(t for t in tokens if t["token_id"] == issued["token_id"])
    assert used["last_used_at"] is not None  # it was used above


def test_revoke_token_refuses_it_at_once_on_every_worker(server: Server) -> None:
    name, token = _service(server)
    other = _kms_json(server, "principals", "issue-token", name)["token"]
    assert _statuses(server, token) == {200}  # now in both workers' caches
    revoked = _kms_json(server, "principals", "revoke-token", name, _token_id(token))
    assert revoked == {"token_id": _token_id(token), "state": "revoked"}
    assert _statuses(server, token) == {401}
    assert _statuses(server, other) == {200}
    assert _ids(server, name) == [_token_id(other)]


def test_rotate_token_without_grace_swaps_tokens_at_once(server: Server) -> None:
    name, old = _service(server)
    assert _statuses(server, old) == {200}
    done = run_kms(
        "principals", "rotate-token", name, _token_id(old), "--grace", "0", env=server.admin_env
    )
    assert done.returncode == 0, done.stderr
    rotated = json.loads(done.stdout)
    new = rotated["token"]
    assert done.stdout.count(new) == 1 and old not in done.stdout
    assert rotated["replaces"] == _token_id(old) and rotated["token_id"] == _token_id(new)
    assert _statuses(server, old) == {401}
    assert _statuses(server, new) == {200}


def test_rotate_token_with_grace_keeps_the_old_one_for_a_while(server: Server) -> None:
    name, old = _service(server)
    rotated = _kms_json(
        server, "principals", "rotate-token", name, _token_id(old), "--grace", "3600"
    )
    assert _statuses(server, old) == {200} and _statuses(server, rotated["token"]) == {200}
    listed = {t["token_id"]: t for t in _kms_json(server, "principals", "tokens", name)}
    until = _when(listed[_token_id(old)]["expires_at"]) - _when(rotated["created_at"])
    assert until == timedelta(seconds=3600)
    # the principal rotates its own token again, ending the grace of the new one at once
    own = run_kms(
        "principals",
        "rotate-token",
        name,
        rotated["token_id"],
        "--ttl",
        "600",
        env={"KMS_URL": server.url, "KMS_TOKEN": rotated["token"], "KMS_TOKEN_FILE": ""},
    )
    assert own.returncode == 0, own.stderr
    again = json.loads(own.stdout)
    assert _when(again["expires_at"]) - _when(again["created_at"]) == timedelta(seconds=600)
    assert _statuses(server, rotated["token"]) == {401}
    assert _statuses(server, again["token"]) == {200}


def test_disable_refuses_every_token_and_enable_restores_them(server: Server) -> None:
    name, token = _service(server)
    second = _kms_json(server, "principals", "issue-token", name)["token"]
    assert _statuses(server, token) == {200}
    disabled = _kms_json(server, "principals", "disable", name)
    assert disabled["name"] == name and disabled["state"] == "disabled"
    assert disabled["disabled_at"] is not None and disabled["sessions_since"] is not None
    assert _statuses(server, token) == {401} and _statuses(server, second) == {401}
    listed = {p["name"]: p for p in _kms_json(server, "principals", "list")}
    assert listed[name]["state"] == "disabled"
    assert _kms_json(server, "principals", "disable", name)["state"] == "disabled"  # idempotent

    enabled = _kms_json(server, "principals", "enable", name)
    assert enabled["state"] == "enabled" and enabled["disabled_at"] is None
    assert enabled["sessions_since"] == disabled["sessions_since"]  # sessions stay ended
    assert _statuses(server, token) == {200} and _statuses(server, second) == {200}


def _dashboard(server: Server, token: str) -> requests.Session:
    web = requests.Session()
    page = web.get(server.url + "/dashboard/login", timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    r = web.post(
        server.url + "/dashboard/login",
        data={"csrf_token": csrf.group(1), "token": token},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 303, r.text
    return web


def _signed_in(server: Server, web: requests.Session) -> bool:
    r = web.get(server.url + "/dashboard/", allow_redirects=False, timeout=30)
    assert r.status_code in (200, 303)
    return r.status_code == 200


def test_end_sessions_signs_the_dashboard_out(server: Server) -> None:
    name = f"auditor-{next(_names)}"
    token = _kms_json(server, "principals", "create", name, "--role", "auditor")["token"]
    web = _dashboard(server, token)
    assert _signed_in(server, web)
    ended = _kms_json(server, "principals", "end-sessions", name)
    assert ended["name"] == name and ended["sessions_since"] is not None
    assert not _signed_in(server, web)
    assert _statuses(server, token) == {403}  # the token itself still authenticates
    later = _dashboard(server, token)  # a new login is a new session
    assert _signed_in(server, later)


def test_a_principal_manages_its_own_tokens_but_issues_none(server: Server) -> None:
    name, token = _service(server)
    own = {"KMS_URL": server.url, "KMS_TOKEN": token, "KMS_TOKEN_FILE": ""}
    listing = run_kms("principals", "tokens", name, env=own)
    assert listing.returncode == 0, listing.stderr
    assert [t["token_id"] for t in json.loads(listing.stdout)] == [_token_id(token)]
    issued = run_kms("principals", "issue-token", name, env=own)
    assert issued.returncode == 1 and "forbidden" in issued.stderr and issued.stdout == ""
    other = run_kms("principals", "disable", name, env=own)
    assert other.returncode == 1 and "forbidden" in other.stderr
    done = run_kms("principals", "revoke-token", name, _token_id(token), env=own)
    assert done.returncode == 0, done.stderr
    assert _statuses(server, token) == {401}


# -- bad input --------------------------------------------------------------------------------

ID = "0123456789abcdef"  # well formed, names no token


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (("disable", "nobody"), 1, "not_found: no principal named 'nobody'"),
        (("enable", "nobody"), 1, "not_found: no principal named 'nobody'"),
        (("end-sessions", "nobody"), 1, "not_found: no principal named 'nobody'"),
        (("tokens", "nobody"), 1, "not_found: no principal named 'nobody'"),
        (("issue-token", "nobody"), 1, "not_found: no principal named 'nobody'"),
        (("rotate-token", "nobody", ID), 1, "not_found: no principal named 'nobody'"),
        (("revoke-token", "nobody", ID), 1, "not_found: no principal named 'nobody'"),
        (("revoke-token", "admin", ID), 1, f"not_found: principal 'admin' has no token {ID}"),
        (("rotate-token", "admin", ID), 1, f"not_found: principal 'admin' has no token {ID}"),
        (("disable", "admin"), 1, "conflict: an admin cannot disable or enable itself"),
        (("revoke-token", "admin", "0123456789ABCDEF"), 2, "16 lowercase hex digits"),
        (("revoke-token", "admin", "../../keys"), 2, "16 lowercase hex digits"),
        (("rotate-token", "admin", "abc"), 2, "16 lowercase hex digits"),
        (("rotate-token", "admin", ID, "--grace", "-1"), 2, "'--grace': -1 is not in the range"),
        (("rotate-token", "admin", ID, "--grace", "soon"), 2, "'--grace': 'soon' is not a valid"),
        (("rotate-token", "admin", ID, "--grace", "2592001"), 2, "not in the range"),
        (("issue-token", "admin", "--ttl", "59"), 2, "'--ttl': 59 is not in the range"),
        (("disable", "a/b"), 2, "Invalid value for 'NAME'"),
        (("tokens", ""), 2, "Invalid value for 'NAME'"),
        (("revoke-token", "admin"), 2, "Missing argument 'TOKEN_ID'"),
    ],
)
def test_bad_input_is_one_clear_line(
    server: Server, args: tuple[str, ...], status: int, message: str
) -> None:
    done = run_kms("principals", *args, env=server.admin_env)
    assert done.returncode == status, done.stderr
    assert message in done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    if status == 1:  # the server's refusal: one line, with its request id
        assert done.stderr.count("\n") == 1 and "(request " in done.stderr


def test_the_admin_still_works_after_the_refusals(server: Server) -> None:
    """Nothing above changed the admin: its token is listed and unexpired."""
    tokens = _kms_json(server, "principals", "tokens", "admin")
    assert len(tokens) == 1 and tokens[0]["expires_at"] is None


# -- the SDK, directly -------------------------------------------------------------------------


def test_sdk_lifecycle_methods(server: Server) -> None:
    name, token = _service(server)
    admin = KmsClient(server.url, server.admin_token)
    try:
        issued = admin.issue_token(name, ttl_seconds=120)
        assert issued["token_id"] == _token_id(issued["token"])
        lifetime = _when(issued["expires_at"]) - _when(issued["created_at"])
        assert lifetime == timedelta(seconds=120)
        assert [t["token_id"] for t in admin.list_tokens(name)] == [
            _token_id(token),
            issued["token_id"],
        ]
        rotated = admin.rotate_token(name, issued["token_id"])  # grace 0 by default
        assert rotated["replaces"] == issued["token_id"]
        assert _statuses(server, issued["token"]) == {401}
        assert _statuses(server, rotated["token"]) == {200}
        assert admin.revoke_token(name, _token_id(token)) == {
            "token_id": _token_id(token),
            "state": "revoked",
        }
        assert _statuses(server, token) == {401}
        assert admin.disable_principal(name)["state"] == "disabled"
        assert _statuses(server, rotated["token"]) == {401}
        assert admin.enable_principal(name)["state"] == "enabled"
        assert _statuses(server, rotated["token"]) == {200}
        assert admin.end_sessions(name)["sessions_since"] is not None

        with pytest.raises(KmsClientError) as e:
            admin.disable_principal("nobody")
        assert (e.value.code, e.value.status) == ("not_found", 404)
        with pytest.raises(KmsClientError) as e:
            admin.revoke_token(name, "NOT-AN-ID")
        assert (e.value.code, e.value.status) == ("invalid_request", 400)
        with pytest.raises(KmsClientError) as e:
            admin.rotate_token(name, rotated["token_id"], grace_seconds=-1)
        assert (e.value.code, e.value.status) == ("invalid_request", 400)
        with pytest.raises(KmsClientError) as e:
            admin.issue_token(name, ttl_seconds=10)
        assert (e.value.code, e.value.status) == ("invalid_request", 400)
        with pytest.raises(KmsClientError) as e:
            admin.rotate_token(name, issued["token_id"])  # expired by its rotation
        assert (e.value.code, e.value.status) == ("conflict", 409)
        assert _statuses(server, rotated["token"]) == {200}  # no refusal changed anything
    finally:
        admin.close()

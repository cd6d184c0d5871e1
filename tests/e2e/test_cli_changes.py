"""``kms changes`` (kms/cli/changes.py) against a real gunicorn server under dual control,
its data directory made by the real ``kms init`` with two custodians pinned (officer in
keyholder, dpo in data_owner; keys from the real ``kms escrow keygen``): a gated command
is only proposed, custodians approve it with their keys offline, its proposer applies it;
a rejection, a signature by the wrong key, a server whose shown change does not match its
digest (a tampering proxy in front of the real server) and bad input each end in one
clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers import Server, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e

CUSTODIANS = (("officer", "keyholder"), ("dpo", "data_owner"))
MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cli-changes")
    data = root / "data"
    pins = []
    for name, group in CUSTODIANS:
        done = run_kms("escrow", "keygen", "--out", str(root / f"{name}.key"))
        assert done.returncode == 0, done.stderr
        pins += ["--custodian", f"{name}:{group}:{done.stdout.strip()}"]
    # both groups must approve every change, and a rejection by either rejects it (pinned
    # at this first init; without it the policy requires no group, and a rejection only
    # leaves the change short of its quorum)
    done = run_kms(
        "init",
        *("--data-dir", str(data), *pins),
        env={"KMS_CHANGE_REQUIRED_GROUPS": "keyholder,data_owner"},
    )
    assert done.returncode == 0, done.stderr
    assert "control policy: mode=dual quorum=2 groups=data_owner,keyholder" in done.stdout
    with gunicorn_server(data, workers=2) as srv:
        yield srv


def _key(server: Server, name: str) -> str:
    return str(server.data_dir.parent / f"{name}.key")


def _kms(server: Server, who: str, *args: str, url: str | None = None) -> Any:
    """``kms ARGS`` with ``who``'s token (admin, or a custodian's token file that
    ``kms init`` wrote)."""
    token = "admin.token" if who == "admin" else f"custodian-{who}.token"
    env = {"KMS_URL": url or server.url, "KMS_TOKEN_FILE": str(server.data_dir / token)}
    return run_kms(*args, env=env)


def _ok(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def _refused(done: subprocess.CompletedProcess[str], message: str, status: int = 1) -> None:
    assert done.returncode == status, done.stdout + done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def _propose(server: Server, *args: str) -> dict[str, Any]:
    """Run a gated admin command: it must be proposed, not done, and say what next."""
    done = _kms(server, "admin", *args)
    answer = _ok(done)
    change = answer["change"]
    assert set(answer) == {"change", "message"} and change["state"] == "pending"
    cid = change["change_id"]
    assert f"change {cid} proposed ({change['kind']})" in done.stderr
    assert f"kms changes approve {cid} --key FILE --custodian NAME" in done.stderr
    assert f"kms changes apply {cid}" in done.stderr
    return dict(change)


def _decide(server: Server, who: str, cid: str, decision: str = "approve", **kw: str) -> Any:
    key = kw.get("key", _key(server, who))
    custodian = kw.get("custodian", who)
    return _kms(
        server,
        who,
        "changes",
        decision,
        cid,
        "--key",
        key,
        "--custodian",
        custodian,
        "--yes",
        url=kw.get("url"),
    )


def _through(server: Server, *args: str) -> Any:
    """A gated admin command proposed, approved by both custodians, applied: the apply's
    answer."""
    cid = _propose(server, *args)["change_id"]
    for who in ("officer", "dpo"):
        _ok(_decide(server, who, cid))
    return _ok(_kms(server, "admin", "changes", "apply", cid))


def _names(server: Server) -> set[str]:
    return {p["name"] for p in _ok(_kms(server, "admin", "principals", "list"))}


def test_a_service_is_proposed_approved_by_both_custodians_and_applied(
    server: Server, tmp_path: Path
) -> None:
    change = _propose(server, "principals", "create", "svc", "--role", "service")
    cid = change["change_id"]
    assert change["kind"] == "create_principal" and change["proposer"] == "admin"
    assert change["params"] == {"name": "svc", "role": "service", "ttl_seconds": None}
    assert "svc" not in _names(server)
    listed = _ok(_kms(server, "admin", "changes", "list", "--state", "pending"))
    assert cid in [c["change_id"] for c in listed]
    assert _ok(_kms(server, "officer", "changes", "list"))[0]["change_id"] == cid
    shown = _ok(_kms(server, "officer", "changes", "show", cid))
    assert shown == change
    _refused(_kms(server, "admin", "changes", "apply", cid), "lacks approvals: it has 0 of 2")

    first = _decide(server, "officer", cid)
    assert _ok(first)["approvals"] == ["officer"] and not _ok(first)["approved"]
    # what was signed, shown before signing: printable text, the digest recomputed
    for text in (f"Change {cid}: create_principal, proposed by admin", "role", "service"):
        assert text in first.stderr
    assert f"digest {change['digest']} (recomputed here: it matches)" in first.stderr
    assert "needs a member of each of: data_owner, keyholder" in first.stderr
    _refused(_kms(server, "admin", "changes", "apply", cid), "it has 1 of 2")
    second = _ok(_decide(server, "dpo", cid))
    assert second["approvals"] == ["dpo", "officer"] and second["approved"] is True

    applied = _ok(_kms(server, "admin", "changes", "apply", cid))
    assert applied["name"] == "svc" and applied["role"] == "service"
    assert applied["token"].startswith("kms_")
    token_file = tmp_path / "svc.token"
    token_file.write_text(applied["token"])
    tokens = run_kms(
        "principals",
        *("tokens", "svc"),
        env={"KMS_URL": server.url, "KMS_TOKEN_FILE": str(token_file)},
    )
    assert len(_ok(tokens)) == 1  # the new service's token works
    assert "svc" in _names(server)
    assert _ok(_kms(server, "admin", "changes", "show", cid))["state"] == "applied"
    _refused(_kms(server, "admin", "changes", "apply", cid), "conflict: the change is applied")
    _refused(_decide(server, "officer", cid), "the change is applied")
    ops = [r["operation"] for r in map(json.loads, server.kms("audit", "list").splitlines())]
    for op in ("propose_change", "approve_change", "apply_change", "create_principal"):
        assert op in ops


def test_other_gated_commands_are_proposed(server: Server) -> None:
    _ok(_kms(server, "admin", "keys", "create", "--alias", "gated"))  # not gated
    assert _ok(_kms(server, "admin", "principals", "create", "aud", "--role", "auditor"))["token"]
    _through(server, "principals", "create", "svc-gated", "--role", "service")
    encrypt = ("grants", "set", "gated", "--principal", "svc-gated", "--operations", "encrypt")
    assert _ok(_kms(server, "admin", *encrypt))["operations"] == ["encrypt"]  # not gated
    grant = _propose(
        server, "grants", "set", "gated", "--principal", "svc-gated", "--operations", "decrypt"
    )
    assert grant["kind"] == "grant" and grant["params"]["operations"] == ["decrypt"]
    deletion = _propose(server, "keys", "schedule-deletion", "gated", "--pending-days", "7")
    assert deletion["kind"] == "schedule_deletion"
    assert _ok(_kms(server, "admin", "keys", "show", "gated"))["state"] == "enabled"
    policy = _ok(_kms(server, "admin", "changes", "policy"))
    assert policy == {
        "mode": "dual",
        "quorum": 2,
        "required_groups": ["data_owner", "keyholder"],
        "ttl_seconds": 604800,
    }
    proposed = _propose(server, "changes", "set-policy", "--quorum", "1")
    assert proposed["kind"] == "set_control_policy"
    assert proposed["params"] == {**policy, "quorum": 1}
    for change in (grant, deletion, proposed):
        cancelled = _ok(_kms(server, "admin", "changes", "cancel", change["change_id"]))
        assert cancelled["state"] == "cancelled"
    _refused(_decide(server, "dpo", grant["change_id"]), "Error: the change is cancelled")
    assert _ok(_kms(server, "admin", "changes", "policy")) == policy
    cancelled = _ok(_kms(server, "admin", "changes", "list", "--state", "cancelled"))
    assert {c["change_id"] for c in cancelled} == {
        c["change_id"] for c in (grant, deletion, proposed)
    }


def test_a_rejection_by_a_needed_custodian_rejects(server: Server) -> None:
    change = _propose(server, "principals", "create", "svc-rejected", "--role", "service")
    cid = change["change_id"]
    _ok(_decide(server, "officer", cid))
    rejected = _decide(server, "dpo", cid, "reject")
    assert _ok(rejected)["state"] == "rejected" and _ok(rejected)["rejections"] == ["dpo"]
    _refused(_kms(server, "admin", "changes", "apply", cid), "conflict: the change is rejected")
    assert "svc-rejected" not in _names(server)
    assert cid in [
        c["change_id"] for c in _ok(_kms(server, "admin", "changes", "list", "--state", "rejected"))
    ]


def test_a_signature_by_the_wrong_key_is_refused(server: Server) -> None:
    change = _propose(server, "principals", "create", "svc-wrong-key", "--role", "service")
    cid = change["change_id"]
    # officer's token and name, dpo's key: the server finds the signature is not officer's
    wrong = _decide(server, "officer", cid, key=_key(server, "dpo"))
    _refused(wrong, "forbidden: the signature does not match this change")
    # dpo's own key and token, signing as officer: not dpo's decision to submit
    _refused(_decide(server, "dpo", cid, custodian="officer"), "forbidden: a custodian submits")
    # the admin is no custodian
    admin = _kms(
        server,
        "admin",
        *("changes", "approve", cid, "--key", _key(server, "officer")),
        *("--custodian", "officer", "--yes"),
    )
    _refused(admin, "forbidden")
    assert _ok(_kms(server, "admin", "changes", "show", cid))["approvals"] == []


class _Tamperer:
    """A proxy in front of the real server that shows every change with another name in
    its params (its digest left as the server computed it), and records what it passed."""

    def __init__(self, target: str) -> None:
        self.seen: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self, method: str) -> None:
                outer.seen.append((method, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                r = requests.request(
                    method,
                    target + self.path,
                    data=self.rfile.read(length) if length else None,
                    headers={
                        k: v
                        for k, v in self.headers.items()
                        if k in ("Authorization", "Content-Type")
                    },
                    timeout=30,
                )
                body = r.content
                if method == "GET" and self.path.startswith("/v1/changes/"):
                    shown = r.json()
                    shown["change"]["params"]["name"] = "someone-else"
                    body = json.dumps(shown).encode()
                self.send_response(r.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_a_change_shown_otherwise_than_its_digest_is_not_signed(server: Server) -> None:
    change = _propose(server, "principals", "create", "svc-tampered", "--role", "service")
    cid = change["change_id"]
    proxy = _Tamperer(server.url)
    try:
        done = _decide(server, "officer", cid, url=proxy.url)
    finally:
        proxy.httpd.shutdown()
        proxy.httpd.server_close()
    _refused(done, "digest_mismatch: the server's digest does not match the change's fields")
    assert "someone-else" not in done.stderr  # nothing was shown as if it were signed
    assert proxy.seen == [("GET", f"/v1/changes/{cid}")]  # and nothing was submitted
    assert _ok(_kms(server, "admin", "changes", "show", cid))["approvals"] == []


def test_bad_input_is_one_clear_line(server: Server, tmp_path: Path) -> None:
    change = _propose(server, "principals", "create", "svc-bad-input", "--role", "service")
    cid = change["change_id"]
    _refused(_kms(server, "admin", "changes", "show", MISSING), "not_found: no such change")
    _refused(_decide(server, "officer", MISSING), "not_found: no such change")
    _refused(_kms(server, "admin", "changes", "apply", MISSING), "not_found")
    for bad in ("nope", "../principals", cid.upper(), cid + "0"):
        _refused(_kms(server, "admin", "changes", "show", bad), "a change id is a UUID", 2)
        _refused(_decide(server, "officer", bad), "a change id is a UUID", 2)
    missing = _decide(server, "officer", cid, key=str(tmp_path / "no-such.key"))
    _refused(missing, "does not exist", 2)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    _refused(_decide(server, "officer", cid, key=str(ec_key)), "not an Ed25519 private key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    _refused(_decide(server, "officer", cid, key=str(garbage)), "cannot read the custodian key")
    _refused(_kms(server, "admin", "changes", "list", "--state", "expired"), "Invalid value", 2)
    _refused(
        _kms(server, "admin", "changes", "set-policy", "--ttl-seconds", "10"), "Invalid value", 2
    )
    _refused(_kms(server, "admin", "changes", "set-policy"), "nothing to change", 2)
    args = ("changes", "approve", cid, "--key", _key(server, "officer"), "--custodian", "officer")
    unanswered = subprocess.run(  # no --yes, and no answer on stdin
        [sys.executable, "-m", "kms", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "KMS_URL": server.url,
            "KMS_TOKEN_FILE": str(server.data_dir / "custodian-officer.token"),
        },
        timeout=120,
        check=False,
    )
    _refused(unanswered, "Error: not signed")
    assert _ok(_kms(server, "admin", "changes", "show", cid))["approvals"] == []

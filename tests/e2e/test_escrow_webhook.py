"""Public-authority access end to end through a live gunicorn server and the real ``kms``
command, with a real local HTTP receiver standing for the data owner's webhook."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kms.client import KmsClient
from tests.helpers import free_port, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e
SECRET = b"data-owner-shared-webhook-secret"


class Receiver:
    """The data owner's endpoint: refuses the first ``fail_first`` deliveries with 503."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.attempts: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ts = self.headers["X-KMS-Timestamp"]
                expected = (
                    "v1=" + hmac.new(SECRET, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
                )
                valid = hmac.compare_digest(expected, self.headers["X-KMS-Signature"])
                entry = {
                    "valid": valid,
                    "event": self.headers["X-KMS-Event"],
                    "body": json.loads(body),
                    "at": time.monotonic(),
                }
                receiver.attempts.append(entry)
                ok = valid and len(receiver.attempts) > receiver.fail_first
                if ok:
                    receiver.accepted.append(entry)
                self.send_response(200 if ok else 503)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/kms-events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, event: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.accepted:
                if entry["event"] == event:
                    return entry
            time.sleep(0.1)
        raise AssertionError(f"{event} not delivered; attempts: {self.attempts}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_public_authority_access_with_webhook(
    fresh_data_dir: Path, tmp_path: Path, receiver: Receiver
) -> None:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    env = {
        "KMS_ESCROW_WEBHOOK_URL": receiver.url,
        "KMS_ESCROW_WEBHOOK_SECRET_FILE": str(secret),
        "KMS_ESCROW_WAITING_PERIOD_SECONDS": "4",
        "KMS_ESCROW_QUORUM": "2",
        "KMS_ESCROW_REQUIRED_GROUPS": "keyholder,data_owner",
        "KMS_ESCROW_VETO_GROUPS": "data_owner",
    }
    with gunicorn_server(fresh_data_dir, workers=2, env=env) as server:
        admin = KmsClient(server.url, server.admin_token)
        svc = admin.create_principal("records-app", "service")
        admin.create_key("records")
        admin.grant("records", "records-app", ["datakey"])
        dk = KmsClient(server.url, svc["token"]).datakey("records", {"patient": "p-17"})
        blob = tmp_path / "p-17.blob"
        blob.write_bytes(dk.ciphertext)

        def token_file(name: str, role: str) -> Path:
            path = tmp_path / f"{name}.token"
            path.write_text(admin.create_principal(name, role)["token"])
            return path

        def kms(token: Path, *args: str) -> str:
            done = run_kms(*args, env={"KMS_URL": server.url, "KMS_TOKEN_FILE": str(token)})
            assert done.returncode == 0, done.stderr
            return done.stdout

        admin_token = fresh_data_dir / "admin.token"
        for name, group in (("kh-officer", "keyholder"), ("dpo", "data_owner")):
            tok = token_file(name, "custodian")
            public = kms(tok, "escrow", "keygen", "--out", str(tmp_path / f"{name}.key")).strip()
            kms(
                admin_token,
                "escrow",
                "register-custodian",
                name,
                "--group",
                group,
                "--public-key",
                public,
            )
        police = token_file("police", "requester")

        started = time.monotonic()
        case = json.loads(
            kms(
                police,
                "escrow",
                "file",
                "--legal-basis",
                "Court order 117",
                "--reference",
                "INV-117",
                "--justification",
                "legal_request",
                "--key",
                "records",
                "--context",
                "patient=p-17",
                "--blob",
                str(blob),
                "--max-unwraps",
                "1",
                "--expires-in",
                "3600",
            )
        )
        assert time.monotonic() - started < 10  # the receiver refusing never blocks filing
        cid = case["case_id"]
        pending = admin.get_case(cid)["notifications"]
        assert [(n["event"], n["state"]) for n in pending] == [("case_filed", "pending")]
        try:
            filed = receiver.wait_for("case_filed")
        except AssertionError:
            print(server.log_text()[-5000:])
            raise
        assert (
            filed["body"]["case"]["case_id"] == cid and filed["body"]["case"]["state"] == "pending"
        )
        # retried with backoff: two refusals, then delivery, each attempt audited
        assert [a["valid"] for a in receiver.attempts[:3]] == [True, True, True]
        assert filed["at"] - receiver.attempts[0]["at"] >= 2.5

        for name in ("kh-officer", "dpo"):
            kms(
                tmp_path / f"{name}.token",
                "escrow",
                "approve",
                cid,
                "--key",
                str(tmp_path / f"{name}.key"),
                "--custodian",
                name,
            )
        approved = receiver.wait_for("case_approved")
        # the data owner sees the approved case, and when it will become active, before it is
        seen = approved["body"]["case"]
        assert seen["state"] == "approved" and seen["active_from"]
        assert admin.get_case(cid)["state"] == "approved"
        refused = run_kms(
            "escrow",
            "unwrap",
            cid,
            "--blob",
            str(blob),
            "--context",
            "patient=p-17",
            "--justification",
            "legal_request",
            env={"KMS_URL": server.url, "KMS_TOKEN_FILE": str(police)},
        )
        assert refused.returncode == 1 and "forbidden" in refused.stderr

        time.sleep(4.5)
        plaintext = kms(
            police,
            "escrow",
            "unwrap",
            cid,
            "--blob",
            str(blob),
            "--context",
            "patient=p-17",
            "--justification",
            "legal_request",
        ).strip()
        assert plaintext == base64.b64encode(dk.plaintext).decode()
        view = admin.get_case(cid)
        assert view["state"] == "active" and view["unwraps_used"] == 1
        assert {n["event"]: n["state"] for n in view["notifications"]} == {
            "case_filed": "delivered",
            "case_approved": "delivered",
        }
        records = admin.audit(after=0, limit=1000)
        deliveries = [
            (r["outcome"], r["detail"]) for r in records if r["operation"] == "webhook_delivery"
        ]
        assert [o for o, _ in deliveries[:3]] == ["delivery_failed", "delivery_failed", "ok"]
        assert any(
            r["operation"] == "decrypt" and r["case_id"] == cid and r["outcome"] == "ok"
            for r in records
        )

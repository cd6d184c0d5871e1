"""Public-authority access end to end through a live gunicorn server and the real ``kms``
command, with a real local HTTP receiver standing for the data owner's webhook."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from kms.backends.storage import schema as t
from kms.client import KmsClient
from tests.helpers import SECRET, Receiver, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2, fail_event="case_filed")
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_public_authority_access_with_webhook(
    fresh_data_dir: Path, tmp_path: Path, receiver: Receiver
) -> None:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # as the server requires
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

        pins = []
        for name, group in (("kh-officer", "keyholder"), ("dpo", "data_owner")):
            tok = token_file(name, "custodian")
            public = kms(tok, "escrow", "keygen", "--out", str(tmp_path / f"{name}.key")).strip()
            pins += ["--custodian", f"{name}:{group}:{public}"]
        # the first custodians are pinned on the server host (the API adds no first member)
        pinned = run_kms("init", "--data-dir", str(fresh_data_dir), *pins, env=env)
        assert pinned.returncode == 0, pinned.stderr
        assert "custodian dpo pinned in group data_owner" in pinned.stdout
        registered = receiver.wait_for("custodian_registered")  # the data owner is told
        assert registered["body"]["custodian"]["name"] in ("kh-officer", "dpo")
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
        tries = [a for a in receiver.attempts if a["event"] == "case_filed"]
        assert [a["valid"] for a in tries] == [True, True, True]
        assert filed["at"] - tries[0]["at"] >= 2.5

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
                "--yes",
            )
        approved = receiver.wait_for("case_approved")
        # the data owner sees the approved case before it can become active: the waiting
        # period starts only once this notification was delivered
        seen = approved["body"]["case"]
        assert seen["state"] == "approved" and seen["case_id"] == cid
        time.sleep(0.5)
        view = admin.get_case(cid)
        assert view["state"] == "approved" and view["active_from"] > approved["body"]["sent_at"]
        unwrap = ("escrow", "unwrap", cid, "--blob", str(blob), "--context", "patient=p-17",
                  "--justification", "legal_request")  # fmt: skip
        refused = run_kms(*unwrap, env={"KMS_URL": server.url, "KMS_TOKEN_FILE": str(police)})
        assert refused.returncode == 1 and "forbidden" in refused.stderr

        time.sleep(4.5)
        db = sa.create_engine(f"sqlite:///{fresh_data_dir / 'kms.sqlite3'}")
        cases = t.escrow_cases
        with db.begin() as c:  # the database writer keeps the row from before the unwrap
            before = dict(c.execute(sa.select(cases)).mappings().one())
        plaintext = kms(police, *unwrap).strip()
        assert plaintext == base64.b64encode(dk.plaintext).decode()
        view = admin.get_case(cid)
        assert view["state"] == "active" and view["unwraps_used"] == 1
        assert {n["event"]: n["state"] for n in view["notifications"]} == {
            "case_filed": "delivered",
            "case_approved": "delivered",
        }
        records = admin.audit(after=0, limit=1000)
        deliveries = [
            r["outcome"]
            for r in records
            if r["operation"] == "webhook_delivery" and r["detail"].startswith("case_filed")
        ]
        assert deliveries == ["delivery_failed", "delivery_failed", "ok"]
        assert any(
            r["operation"] == "decrypt" and r["case_id"] == cid and r["outcome"] == "ok"
            for r in records
        )

        # Issue 15, attack 4: that row written back with its own valid seal would refill
        # the budget of 1; the next unwrap is refused instead, the reason in the trail.
        env = {"KMS_URL": server.url, "KMS_TOKEN_FILE": str(police)}
        assert run_kms(*unwrap, env=env).returncode == 1  # the budget is used up
        with db.begin() as c:
            c.execute(sa.update(cases).where(cases.c.case_id == cid).values(before))
        again = run_kms(*unwrap, env=env)
        assert again.returncode == 1 and "forbidden" in again.stderr
        last = admin.audit(operation="decrypt")[-1]
        assert last["case_id"] == cid and last["outcome"] == "forbidden"
        assert "the case row " + cid + " is an older sealed copy" in last["detail"]
        db.dispose()

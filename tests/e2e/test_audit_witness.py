"""Attacks 2 and 3 of issue 15 against a live gunicorn server, its SoftHSM token and
SQLite database, with the real ``kms`` command: a bundle no signature covers fails the
verifier by default, and a laundered history that the server signed again is caught by the
data owner's witnessed checkpoints (received over the signed webhook and pulled from the
checkpoint feed with an auditor token)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from kms.client import KmsClient
from kms.formats import audit_record
from tests.helpers import SECRET, Receiver, Server, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e


def verify(*args: str) -> tuple[int, str]:
    done = run_kms("audit", "verify", *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout + done.stderr


def test_a_bundle_without_a_signature_fails_by_default(server: Server, tmp_path: Path) -> None:
    """Attack 3: a chain anyone can compute, shipped without checkpoints."""
    KmsClient(server.url, server.admin_token).create_key("unsigned-demo")
    server.kms("audit", "checkpoint")
    bundle, pem = tmp_path / "all.jsonl", tmp_path / "audit.pem"
    server.kms("audit", "export", "--out", str(bundle))
    server.kms("audit", "public-key", "--out", str(pem))
    assert verify(str(bundle), "--public-key", str(pem))[0] == 0
    # the forger's bundle: a record edited, the chain recomputed, no checkpoint
    prev, lines = audit_record.GENESIS_HASH, []
    for x in map(json.loads, bundle.read_text().splitlines()):
        if x["type"] == "checkpoint":
            continue
        if x["type"] == "record":
            body = {k: v for k, v in x.items() if k not in ("type", "hash")}
            body["prev_hash"] = prev
            if body["operation"] == "create_key":
                body["principal"] = "someone-else"
            x = {"type": "record", **body, "hash": audit_record.record_hash(body)}
            prev = x["hash"]
        lines.append(json.dumps(x))
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(lines) + "\n")
    code, out = verify(str(forged), "--public-key", str(pem))
    assert code == 1, out
    assert "ERROR: no valid checkpoint signature covers the bundle" in out
    assert "kms audit checkpoint" in out and out.rstrip().endswith("FAILED")
    # with the explicit flag it passes, and says loudly what was not checked
    code, out = verify(str(forged), "--public-key", str(pem), "--allow-unsigned")
    assert code == 0, out
    assert "NOT VERIFIED BY SIGNATURE: no valid checkpoint signature covers the bundle" in out
    assert out.rstrip().endswith("VERIFIED ONLY IN PART: see NOT VERIFIED BY SIGNATURE above")


def _launder(db_path: Path, unwanted: str) -> int:
    """Attack 2, done by someone who can write the database (server stopped): delete every
    checkpoint and the unwanted records, re-chain the rest with the public record-hash
    function, reset the head. Returns the new head's seq."""
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    with db:
        rows = [dict(r) for r in db.execute("SELECT * FROM audit_records ORDER BY seq")]
        kept = [r for r in rows if r["request_id"] != unwanted]
        assert len(kept) < len(rows)
        prev = audit_record.GENESIS_HASH
        for seq, row in enumerate(kept, 1):
            row.update(seq=seq, prev_hash=prev)
            row["hash"] = prev = audit_record.record_hash(
                {k: v for k, v in row.items() if k != "hash"}
            )
        db.execute("DELETE FROM audit_checkpoints")
        db.execute("DELETE FROM audit_records")
        columns = list(kept[0])  # the table's own column names
        db.executemany(
            f"INSERT INTO audit_records ({', '.join(columns)}) "  # noqa: S608
            f"VALUES ({', '.join('?' for _ in columns)})",
            [[r[c] for c in columns] for r in kept],
        )
        db.execute("UPDATE audit_head SET seq = ?, hash = ?, checkpoint_seq = 0", (len(kept), prev))
    db.close()
    return len(kept)


def _wait_for_checkpoints(receiver: Receiver, seqs: set[int]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        bodies = [a["body"] for a in receiver.accepted if a["event"] == "audit_checkpoint"]
        if seqs <= {b["checkpoint"]["seq"] for b in bodies}:
            return bodies
        time.sleep(0.1)
    raise AssertionError(f"checkpoints {seqs} not delivered: {receiver.attempts}")


def test_witnessed_checkpoints_catch_a_laundered_history(
    fresh_data_dir: Path, tmp_path: Path, receiver: Receiver
) -> None:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # as the server requires
    env = {
        "KMS_ESCROW_WEBHOOK_URL": receiver.url,
        "KMS_ESCROW_WEBHOOK_SECRET_FILE": str(secret),
        "KMS_AUDIT_CHECKPOINT_SECONDS": "0",  # sign only on demand and at shutdown
    }
    owner_token = tmp_path / "data-owner.token"
    owner = {"KMS_TOKEN_FILE": str(owner_token)}
    witnessed = tmp_path / "witnessed.jsonl"
    with gunicorn_server(fresh_data_dir, workers=2, env=env) as server:
        admin = KmsClient(server.url, server.admin_token)
        # the data owner holds an auditor token: read-only, it can pull the feed and export
        owner_token.write_text(admin.create_principal("data-owner", "auditor")["token"])
        owner["KMS_URL"] = server.url
        svc = admin.create_principal("app", "service")
        admin.create_key("records")
        admin.grant("records", "app", ["datakey", "decrypt"])
        app = KmsClient(server.url, svc["token"])
        dk = app.datakey("records", {"patient": "p-17"})
        app.decrypt(dk.ciphertext, {"patient": "p-17"})  # the unwrap the insider will hide
        (unwanted,) = [r for r in admin.audit(after=0, limit=1000) if r["operation"] == "decrypt"]
        first = json.loads(server.kms("audit", "checkpoint"))
        app.datakey("records", {"patient": "p-18"})
        second = json.loads(server.kms("audit", "checkpoint"))
        # pushed: each checkpoint reached the data owner over the signed webhook
        bodies = _wait_for_checkpoints(receiver, {first["seq"], second["seq"]})
        pushed = {b["checkpoint"]["seq"]: b["checkpoint"] for b in bodies}
        assert pushed[first["seq"]] == first and pushed[second["seq"]] == second
        assert all(a["valid"] for a in receiver.attempts)
        # pulled: the feed with the data owner's token gives the same checkpoints
        done = run_kms("audit", "checkpoints", "--after", "0", env=owner)
        assert done.returncode == 0, done.stderr
        feed = [json.loads(x) for x in done.stdout.splitlines()]
        assert first in feed and second in feed
        # the data owner's file: webhook bodies as received, feed lines as printed
        witnessed.write_text("".join(json.dumps(b) + "\n" for b in bodies) + done.stdout)
        pem = tmp_path / "audit.pem"
        assert run_kms("audit", "public-key", "--out", str(pem), env=owner).returncode == 0
        honest = tmp_path / "honest.jsonl"
        assert run_kms("audit", "export", "--out", str(honest), env=owner).returncode == 0
    code, out = verify(str(honest), "--public-key", str(pem), "--witnessed", str(witnessed))
    assert code == 0, out
    assert "witnessed checkpoints:" in out and out.rstrip().endswith("VERIFIED")

    # the insider launders the history with the server stopped
    _launder(fresh_data_dir / "kms.sqlite3", unwanted["request_id"])
    # the keyholder's admin accepts the database as it is (the HSM anchor would refuse it
    # otherwise): the HSM then signs the forged head, as in the attack
    accepted = run_kms(
        "audit", "accept-state", "--data-dir", str(fresh_data_dir), "--reason", "restore", "--yes"
    )
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    with gunicorn_server(fresh_data_dir, workers=1, env=env) as server:
        server.kms("audit", "checkpoint")
        owner["KMS_URL"] = server.url
        forged = tmp_path / "forged.jsonl"
        assert run_kms("audit", "export", "--out", str(forged), env=owner).returncode == 0
    records = [json.loads(x) for x in forged.read_text().splitlines() if '"record"' in x]
    assert unwanted["request_id"] not in {r["request_id"] for r in records}
    # alone, the signed forgery verifies: that is what witnesses are for
    code, out = verify(str(forged), "--public-key", str(pem))
    assert code == 0 and out.rstrip().endswith("VERIFIED"), out
    code, out = verify(str(forged), "--public-key", str(pem), "--witnessed", str(witnessed))
    assert code == 1, out
    assert f"witnessed checkpoint at seq {first['seq']}:" in out
    assert "the trail was rewritten after that checkpoint was witnessed" in out
    assert out.rstrip().endswith("FAILED")

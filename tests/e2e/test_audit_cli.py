"""The auditor's workflow with the real ``kms`` command against a live gunicorn server,
and a signed, verifiable chain after concurrent traffic through 2 workers."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kms.client import KmsClient
from tests.helpers import Server, gunicorn_server, run_kms

pytestmark = pytest.mark.e2e


def test_concurrent_operations_leave_one_signed_linear_chain(
    fresh_data_dir: Path, tmp_path: Path
) -> None:
    with gunicorn_server(fresh_data_dir, workers=2) as server:
        admin = KmsClient(server.url, server.admin_token)
        svc = admin.create_principal("app", "service")
        admin.create_key("k")
        admin.grant("k", "app", ["datakey", "decrypt"])
        app = KmsClient(server.url, svc["token"])
        before = admin.audit(after=0, limit=1000)[-1]["seq"]

        def work(i: int) -> None:
            dk = app.datakey("k", {"n": str(i)})
            assert app.decrypt(dk.ciphertext, {"n": str(i)}) == dk.plaintext

        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(work, range(100)))
        server.kms("audit", "checkpoint")
        bundle, report = server.export_and_verify(tmp_path)
    assert "VERIFIED" in report and "unsigned tail: 0" in report
    records = [json.loads(x) for x in bundle.read_text().splitlines() if '"record"' in x]
    ops = [r["operation"] for r in records if r["seq"] > before]
    assert ops.count("datakey") == 100 and ops.count("decrypt") == 100
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


def test_clean_shutdown_signs_a_checkpoint(fresh_data_dir: Path) -> None:
    with gunicorn_server(fresh_data_dir, workers=2) as server:
        KmsClient(server.url, server.admin_token).create_key("k")
    with sqlite3.connect(fresh_data_dir / "kms.sqlite3") as db:
        head = db.execute("SELECT seq FROM audit_head").fetchone()[0]
        signed = db.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()[0]
    assert signed == head


def test_auditor_workflow(server: Server, tmp_path: Path) -> None:
    admin = KmsClient(server.url, server.admin_token)
    auditor = admin.create_principal("auditor-1", "auditor")
    token = tmp_path / "auditor.token"
    token.write_text(auditor["token"])
    env = {"KMS_URL": server.url, "KMS_TOKEN_FILE": str(token)}

    def kms(*args: str) -> str:
        done = run_kms(*args, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    pem = tmp_path / "audit.pem"
    kms("audit", "public-key", "--out", str(pem))
    server.kms("audit", "checkpoint")
    held = tmp_path / "held.json"
    held.write_text(kms("audit", "checkpoints", "--limit", "1000").splitlines()[-1])
    admin.create_key("later")
    first, segment = tmp_path / "first.jsonl", tmp_path / "segment.jsonl"
    kms("audit", "export", "--out", str(first))
    after = json.loads(held.read_text())["seq"]
    kms("audit", "export", "--after", str(after), "--out", str(segment))
    ok = run_kms(
        "audit", "verify", str(segment), "--public-key", str(pem), "--since-checkpoint", str(held)
    )
    assert ok.returncode == 0 and "unsigned tail: 1" in ok.stdout, ok.stdout
    assert run_kms("audit", "verify", str(first), "--public-key", str(pem)).returncode == 0
    # a tampered copy fails with exit 1 and says where
    lines = first.read_text().splitlines()
    i = next(n for n, x in enumerate(lines) if '"seq":2,' in x)
    lines[i] = lines[i].replace('"outcome":"ok"', '"outcome":"nope"')
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines) + "\n")
    bad = run_kms("audit", "verify", str(tampered), "--public-key", str(pem))
    assert bad.returncode == 1 and "seq 2: record edited" in bad.stdout and "FAILED" in bad.stdout
    csv_text = kms(
        "audit", "report", "--since", "2000-01-01", "--until", "2999-01-01", "--format", "csv"
    )
    assert csv_text.startswith("scope,name,total,failures,datakey")
    listed = kms("audit", "list", "--operation", "create_key", "--limit", "1000")
    assert all(json.loads(x)["operation"] == "create_key" for x in listed.splitlines())


def test_verify_refuses_unusable_inputs_clearly(server: Server, tmp_path: Path) -> None:
    bundle = tmp_path / "b.jsonl"
    server.kms("audit", "export", "--out", str(bundle))
    rsa_pem = tmp_path / "rsa.pem"
    rsa_pem.write_bytes(
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"type": "header"\n[]\n')
    anchor = tmp_path / "anchor.json"
    anchor.write_text("[1, 2]")
    good_pem = tmp_path / "good.pem"
    server.kms("audit", "public-key", "--out", str(good_pem))
    cases = [
        (("audit", "verify", str(bundle), "--public-key", str(rsa_pem)), 2, "not an EC P-256 key"),
        (("audit", "verify", str(bundle), "--public-key", str(junk)), 2, "not a PEM public key"),
        (("audit", "verify", str(bundle)), 2, "Missing option '--public-key'"),
        (
            ("audit", "verify", str(junk), "--public-key", str(good_pem)),
            1,
            "line 1: not valid JSON",
        ),
        (
            (
                "audit",
                "verify",
                str(bundle),
                "--public-key",
                str(good_pem),
                "--since-checkpoint",
                str(anchor),
            ),
            2,
            "--since-checkpoint",
        ),
    ]
    for args, code, message in cases:
        done = run_kms(*args)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert message in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_archive_from_the_command_line(fresh_data_dir: Path, tmp_path: Path) -> None:
    with gunicorn_server(fresh_data_dir, workers=1) as server:
        admin = KmsClient(server.url, server.admin_token)
        admin.create_key("a")
        cp = admin.create_checkpoint()
        admin.create_key("b")
        out = tmp_path / "archive.jsonl"
        done = run_kms(
            "audit",
            "archive",
            "--data-dir",
            str(fresh_data_dir),
            "--through",
            str(cp["seq"]),
            "--out",
            str(out),
        )
        assert done.returncode == 0, done.stderr
        assert f"through seq {cp['seq']}" in done.stdout
        again = run_kms(
            "audit",
            "archive",
            "--data-dir",
            str(fresh_data_dir),
            "--through",
            str(cp["seq"]),
            "--out",
            str(tmp_path / "again.jsonl"),
        )
        assert again.returncode == 1 and "checkpoint after" in again.stderr
        rest = tmp_path / "rest.jsonl"
        server.kms("audit", "export", "--out", str(rest))
        pem, held = tmp_path / "a.pem", tmp_path / "held.json"
        server.kms("audit", "public-key", "--out", str(pem))
        held.write_text(json.dumps(cp))
    assert run_kms("audit", "verify", str(out), "--public-key", str(pem)).returncode == 0
    ok = run_kms(
        "audit", "verify", str(rest), "--public-key", str(pem), "--since-checkpoint", str(held)
    )
    assert ok.returncode == 0, ok.stdout

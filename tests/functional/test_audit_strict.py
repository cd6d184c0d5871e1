"""The strict offline verifier (a signature must cover the bundle, the unsigned tail is
bounded, looser checks are explicit and reported) and witnessed checkpoints (each signed
checkpoint queued for the data owner's webhook in the transaction that stores it, and
checked against the bundle by ``kms audit verify --witnessed``). Real SoftHSM audit key,
real SQLite, the real ``kms`` command for the verifier's output."""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.errors import StorageUnavailable
from kms.formats import checkpoint as cpfmt
from kms.services.audit_verify import DEFAULT_MAX_UNSIGNED, verify_bundle
from kms.services.model import AuditEvent
from kms.services.notify import CHECKPOINT_EVENT
from tests.helpers import SECRET, Api, Receiver, run_kms

Lines = list[dict[str, Any]]


@pytest.fixture
def witnessed_app(  # type: ignore[no-untyped-def]
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
):
    """The app with the data owner's webhook, signing only on demand."""
    owner = dataclasses.replace(
        settings,
        audit_checkpoint_records=0,
        escrow_webhook_url=receiver.url,
        escrow_webhook_secret=SECRET,
    )
    return create_app(owner, hsm=hsm, storage=storage)


@pytest.fixture
def owner_api(witnessed_app) -> Api:  # type: ignore[no-untyped-def]
    token = witnessed_app.extensions["kms"].principals.bootstrap_admin("admin")
    assert token is not None
    return Api(witnessed_app.test_client(), token)


def checkpoint(api: Api) -> dict[str, Any]:
    r = api.call("POST", "/v1/audit/checkpoints", api.admin, json={})
    assert r.status_code == 201, r.json
    return dict(r.json)


def export(api: Api, headers: dict[str, str] | None = None) -> Lines:
    r = api.call("GET", "/v1/audit/export", headers or api.admin)
    assert r.status_code == 200, r.get_data()[:300]
    return [json.loads(line) for line in r.get_data().splitlines()]


def public_key(api: Api) -> bytes:
    r = api.call("GET", "/v1/audit/public-key", api.admin)
    assert r.status_code == 200
    return bytes(r.data)


def write(path: Path, lines: Lines) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def verify_cli(*args: str) -> tuple[int, str]:
    done = run_kms("audit", "verify", *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout + done.stderr


def without_checkpoints(lines: Lines) -> Lines:
    return [x for x in lines if x["type"] != "checkpoint"]


# -- strict by default --------------------------------------------------------------------


def test_a_bundle_no_signature_covers_fails_unless_allowed_explicitly(
    api: Api, tmp_path: Path
) -> None:
    """Attack 3 on the verifier's functions: a chain alone is not evidence."""
    api.key("k")
    checkpoint(api)
    lines, pem = export(api), public_key(api)
    assert verify_bundle([json.dumps(x) for x in lines], pem).ok
    unsigned = [json.dumps(x) for x in without_checkpoints(lines)]
    report = verify_bundle(unsigned, pem)
    assert not report.ok
    assert "no valid checkpoint signature covers the bundle" in report.errors[0]
    assert report.summary().endswith("FAILED")
    loose = verify_bundle(unsigned, pem, allow_unsigned=True)
    assert loose.ok and loose.not_verified
    assert "NOT VERIFIED BY SIGNATURE: no valid checkpoint signature" in loose.summary()
    assert loose.summary().endswith("VERIFIED ONLY IN PART: see NOT VERIFIED BY SIGNATURE above")
    # only invalid signatures: fails, and --allow-unsigned does not excuse a forged one
    forged = [dict(x) for x in lines]
    other = ec.generate_private_key(ec.SECP256R1())
    for x in forged:
        if x["type"] == "checkpoint":
            body = {k: v for k, v in x.items() if k != "type"}
            x["signature"] = base64.b64encode(
                other.sign(cpfmt.signed_bytes(body), ec.ECDSA(hashes.SHA256()))
            ).decode()
    for allow in (False, True):
        bad = verify_bundle([json.dumps(x) for x in forged], pem, allow_unsigned=allow)
        assert not bad.ok and any("signature does not verify" in e for e in bad.errors)
    # an empty bundle proves nothing either
    header = [json.dumps(lines[0])]
    assert not verify_bundle(header, pem).ok


def test_a_too_long_unsigned_tail_fails_by_default(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, tmp_path: Path
) -> None:
    app = create_app(
        dataclasses.replace(settings, audit_checkpoint_records=0), hsm=hsm, storage=storage
    )
    services = app.extensions["kms"]
    api = Api(app.test_client(), services.principals.bootstrap_admin("admin"))
    api.key("k")
    signed = checkpoint(api)
    # records written by the real trail, more than the default bound after the checkpoint
    services.audit.record(
        [AuditEvent(f"r-{i}", "svc", "encrypt") for i in range(DEFAULT_MAX_UNSIGNED + 1)]
    )
    bundle = write(tmp_path / "bundle.jsonl", export(api))
    pem = tmp_path / "audit.pem"
    pem.write_bytes(public_key(api))
    code, out = verify_cli(str(bundle), "--public-key", str(pem))
    assert code == 1, out
    assert f"{DEFAULT_MAX_UNSIGNED + 1} records after the last checkpoint, more than the " in out
    assert out.rstrip().endswith("FAILED")
    # looser, on request: it passes but says what no signature covers
    for flags in (("--max-unsigned", "5000"), ("--allow-unsigned",)):
        code, out = verify_cli(str(bundle), "--public-key", str(pem), *flags)
        assert code == 0, out
        first = signed["seq"] + 1
        last = first + DEFAULT_MAX_UNSIGNED
        assert f"NOT VERIFIED BY SIGNATURE: seq {first}..{last} " in out, out
        assert "VERIFIED ONLY IN PART" in out
    # a bound below the tail fails even with --allow-unsigned
    code, out = verify_cli(
        str(bundle), "--public-key", str(pem), "--allow-unsigned", "--max-unsigned", "10"
    )
    assert code == 1 and "more than the 10 allowed" in out
    # once a checkpoint covers them the default passes, and says the tail is empty
    checkpoint(api)
    write(bundle, export(api))
    code, out = verify_cli(str(bundle), "--public-key", str(pem))
    assert code == 0 and "unsigned tail: 0 record(s)" in out and out.rstrip().endswith("VERIFIED")


def test_a_short_tail_is_reported_and_a_held_checkpoint_is_a_signature(api: Api) -> None:
    api.key("k")
    held = checkpoint(api)
    api.key("later")
    pem = public_key(api)
    lines = export(api)
    report = verify_bundle([json.dumps(x) for x in lines], pem)
    assert report.ok and report.unsigned_tail == 1
    assert "unsigned tail: 1 record(s) after the last checkpoint, not covered by a signature" in (
        report.summary()
    )
    # a segment from a held checkpoint, no checkpoint of its own yet: the held one anchors it
    r = api.call("GET", f"/v1/audit/export?after={held['seq']}", api.admin)
    segment = r.get_data().decode().splitlines()
    assert verify_bundle(segment, pem, held).ok
    assert not verify_bundle(segment, pem).ok  # without it: not the first record
    assert not verify_bundle(segment, pem, held, max_unsigned=0).ok


def test_verify_refuses_bad_witness_files_clearly(api: Api, tmp_path: Path) -> None:
    api.key("k")
    cp = checkpoint(api)
    bundle = write(tmp_path / "b.jsonl", export(api))
    pem = tmp_path / "a.pem"
    pem.write_bytes(public_key(api))
    cases = {
        "junk": ("{not json\n", "--witnessed: line 1: not valid JSON"),
        "array": ("[1, 2]\n", "--witnessed: line 1: not a checkpoint"),
        "forged": (
            json.dumps({**cp, "record_hash": "0" * 64}) + "\n",
            "witnessed checkpoint 1: checkpoint signature does not verify",
        ),
        "fields": ('{"seq": 3}\n', "witnessed checkpoint 1: checkpoint fields missing"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        code, out = verify_cli(str(bundle), "--public-key", str(pem), "--witnessed", str(path))
        assert code == 2 and message in out, (name, out)


# -- witnessed checkpoints ----------------------------------------------------------------


def test_each_checkpoint_is_queued_for_the_data_owner_and_delivered_signed(
    owner_api: Api, witnessed_app, receiver: Receiver, db_path: Path
) -> None:  # type: ignore[no-untyped-def]
    api, services = owner_api, witnessed_app.extensions["kms"]
    api.key("k")
    cp = checkpoint(api)
    with sqlite3.connect(db_path) as db:
        queued = db.execute(
            "SELECT case_id, payload, state FROM notifications WHERE event = ?",
            (CHECKPOINT_EVENT,),
        ).fetchall()
    assert [(c, json.loads(p), s) for c, p, s in queued] == [("", cp, "pending")]
    head = api.audit()[-1]["seq"]
    assert services.notifier.deliver_due() == 1
    (delivery,) = [a for a in receiver.accepted if a["event"] == CHECKPOINT_EVENT]
    assert delivery["valid"] and delivery["body"]["checkpoint"] == cp
    assert delivery["body"]["event"] == CHECKPOINT_EVENT
    cpfmt.verify(delivery["body"]["checkpoint"], cpfmt.load_public_key(public_key(api)))
    # the delivery is not chained (it would need a checkpoint, announced in turn, forever)
    assert api.audit()[-1]["seq"] == head
    assert services.audit.checkpoint() == cp
    # the data owner's auditor token pulls the same checkpoints from the feed
    owner = api.principal("auditor", "data-owner")
    feed = api.call("GET", "/v1/audit/checkpoints?after=0", owner)
    assert feed.status_code == 200 and feed.json["checkpoints"][-1] == cp


def test_a_checkpoint_is_stored_only_if_its_announcement_is(
    owner_api: Api, witnessed_app, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Fault injection: the outbox write fails, so the checkpoint is not stored either."""
    api, services = owner_api, witnessed_app.extensions["kms"]
    api.key("k")

    def broken(*args: Any) -> None:
        raise StorageUnavailable()

    monkeypatch.setattr(services.notifier, "announce", broken)
    with pytest.raises(StorageUnavailable):
        services.audit.checkpoint()
    r = api.call("GET", "/v1/audit/checkpoints", api.admin)
    assert r.json["checkpoints"] == []
    monkeypatch.undo()
    assert services.audit.checkpoint() is not None


def test_witnessed_checkpoints_catch_a_rewrite_and_a_rollback(owner_api: Api) -> None:
    api = owner_api
    api.key("a")
    first = checkpoint(api)
    api.key("b")
    second = checkpoint(api)
    pem = public_key(api)
    lines = export(api)
    text = [json.dumps(x) for x in lines]
    witnessed = [first, second, second]  # a retried delivery counts once
    report = verify_bundle(text, pem, witnessed=witnessed)
    assert report.ok and (report.witnessed, report.witnessed_matched) == (2, 2)
    assert "witnessed checkpoints: 2 of 2 found identical in the bundle" in report.summary()

    # rolled back to before the second checkpoint (records and checkpoint gone)
    cut = [
        x for x in lines if not (x["type"] in ("record", "checkpoint") and x["seq"] > first["seq"])
    ]
    rolled = verify_bundle([json.dumps(x) for x in cut], pem, witnessed=witnessed)
    assert verify_bundle([json.dumps(x) for x in cut], pem).ok  # alone: looks fine
    assert not rolled.ok
    assert any(
        f"witnessed checkpoint at seq {second['seq']}: beyond the end" in e for e in rolled.errors
    )

    # the checkpoint deleted, the records kept
    dropped = [x for x in lines if not (x["type"] == "checkpoint" and x["seq"] == first["seq"])]
    report = verify_bundle([json.dumps(x) for x in dropped], pem, witnessed=[first])
    assert any("missing from the bundle" in e for e in report.errors), report.errors

    # a witnessed checkpoint before a segment's start is not compared, and says so
    r = api.call("GET", f"/v1/audit/export?after={second['seq']}", api.admin)
    segment = r.get_data().decode().splitlines()
    report = verify_bundle(segment, pem, second, witnessed=[first, second])
    assert report.ok and (report.witnessed_before, report.witnessed_matched) == (1, 1)

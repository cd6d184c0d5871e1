"""Signed checkpoints, export bundles, the offline verifier's tamper battery (on a bundle
and on the live database), reports and archiving, against the real SoftHSM audit key."""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.errors import InvalidRequest
from kms.formats import audit_record
from kms.formats import checkpoint as cpfmt
from kms.services.audit_verify import Report, VerifyInputError, verify_bundle
from tests.helpers import Api

Lines = list[dict[str, Any]]


@pytest.fixture
def svc(api: Api) -> dict[str, str]:
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    return svc


def traffic(api: Api, svc: dict[str, str], n: int) -> None:
    """``n`` datakeys on key ``k``, each decrypted again: 2n audit records."""
    for i in range(n):
        ctx = {"i": str(i)}
        blob = api.call("POST", "/v1/keys/k/datakey", svc, json={"context": ctx})
        assert blob.status_code == 200, blob.json
        r = api.call(
            "POST", "/v1/decrypt", svc, json={"ciphertext": blob.json["ciphertext"], "context": ctx}
        )
        assert r.status_code == 200, r.json


def checkpoint(api: Api) -> dict[str, Any]:
    r = api.call("POST", "/v1/audit/checkpoints", api.admin, json={})
    assert r.status_code == 201, r.json
    return dict(r.json)


def public_key(api: Api) -> bytes:
    r = api.call("GET", "/v1/audit/public-key", api.admin)
    assert r.status_code == 200 and r.mimetype == "application/x-pem-file"
    return bytes(r.data)


def export(api: Api, query: str = "") -> Lines:
    r = api.call("GET", f"/v1/audit/export{query}", api.admin)
    assert r.status_code == 200, r.get_data()[:300]
    assert r.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in r.get_data().splitlines()]


def verify(
    lines: Lines,
    pem: bytes,
    since: dict[str, Any] | None = None,
    through: dict[str, Any] | None = None,
) -> Report:
    return verify_bundle([json.dumps(x) for x in lines], pem, since, through)


def records(lines: Lines) -> Lines:
    return [x for x in lines if x["type"] == "record"]


def rehash(lines: Lines) -> Lines:
    """What a forger with database access does: recompute every hash after an edit."""
    prev = audit_record.GENESIS_HASH
    out = []
    for x in lines:
        if x["type"] == "record":
            body = {k: v for k, v in x.items() if k not in ("type", "hash")}
            body["prev_hash"] = prev
            x = {"type": "record", **body, "hash": audit_record.record_hash(body)}
            prev = x["hash"]
        out.append(x)
    return out


# -- checkpoints --------------------------------------------------------------------------


def test_checkpoint_is_signed_by_the_hsm_key_and_covers_its_own_request(
    api: Api, svc: dict[str, str]
) -> None:
    traffic(api, svc, 2)
    cp = checkpoint(api)
    head = api.audit()[-1]
    assert head["operation"] == "create_checkpoint"
    assert (cp["seq"], cp["record_hash"]) == (head["seq"], head["hash"])
    key = serialization.load_pem_public_key(public_key(api))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(base64.b64decode(cp["signature"]), cpfmt.signed_bytes(cp), ec.ECDSA(hashes.SHA256()))
    assert cp["key_sha256"] == cpfmt.key_fingerprint(public_key(api))
    listed = api.call("GET", "/v1/audit/checkpoints", api.admin).json["checkpoints"]
    assert listed[-1] == {k: v for k, v in cp.items()}


def test_only_admins_sign_and_only_auditors_and_admins_read(api: Api) -> None:
    auditor = api.principal("auditor")
    service = api.principal("service")
    assert api.call("POST", "/v1/audit/checkpoints", auditor, json={}).status_code == 403
    for path in (
        "/v1/audit/checkpoints",
        "/v1/audit/public-key",
        "/v1/audit/export",
        "/v1/audit/report?since=2020-01-01&until=2030-01-01",
    ):
        assert api.call("GET", path, auditor).status_code == 200, path
        assert api.call("GET", path, service).status_code == 403, path


def test_checkpoint_every_n_records(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage
) -> None:
    app = create_app(
        dataclasses.replace(settings, audit_checkpoint_records=5), hsm=hsm, storage=storage
    )
    api = Api(app.test_client(), app.extensions["kms"].principals.bootstrap_admin("admin"))
    svc = api.principal("service", "svc")
    api.key("k", grant=svc)
    traffic(api, svc, 4)  # 8 crypto records
    cps = api.call("GET", "/v1/audit/checkpoints", api.admin).json["checkpoints"]
    assert cps and all(cp["seq"] >= 5 for cp in cps)
    assert verify(export(api), public_key(api)).checkpoints_verified == len(cps)


# -- export and verify --------------------------------------------------------------------


def test_untouched_bundle_verifies_with_unsigned_tail_reported(
    api: Api, svc: dict[str, str]
) -> None:
    traffic(api, svc, 3)
    cp = checkpoint(api)
    traffic(api, svc, 1)  # two records after the checkpoint
    lines = export(api)
    assert lines[0]["type"] == "header" and lines[0]["after"] == 0
    report = verify(lines, public_key(api))
    assert report.ok, report.errors
    assert report.last_signed_seq == cp["seq"] and report.unsigned_tail == 2
    assert "VERIFIED" in report.summary()


def _battery(api: Api, svc: dict[str, str]) -> tuple[Lines, bytes]:
    traffic(api, svc, 4)
    checkpoint(api)
    traffic(api, svc, 2)
    checkpoint(api)
    traffic(api, svc, 2)
    checkpoint(api)
    return export(api), public_key(api)


def _edit(lines: Lines) -> Lines:
    out = [dict(x) for x in lines]
    records(out)[3]["principal"] = "mallory"
    return out


def _delete(lines: Lines) -> Lines:
    rec = records(lines)
    return [x for x in lines if x is not rec[3]]


def _insert(lines: Lines) -> Lines:
    rec = records(lines)
    forged = {**rec[3], "request_id": "forged", "prev_hash": rec[2]["hash"]}
    body = {k: v for k, v in forged.items() if k not in ("type", "hash")}
    forged["hash"] = audit_record.record_hash(body)
    i = lines.index(rec[3])
    return [*lines[:i], forged, *lines[i:]]


def _duplicate(lines: Lines) -> Lines:
    i = lines.index(records(lines)[3])
    return [*lines[: i + 1], lines[i], *lines[i + 1 :]]


def _reorder(lines: Lines) -> Lines:
    rec = records(lines)
    i, j = lines.index(rec[3]), lines.index(rec[4])
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def _truncate(lines: Lines) -> Lines:
    last = records(lines)[-3:]
    return [x for x in lines if not any(x is y for y in last)]


def _rewrite_consistently(lines: Lines) -> Lines:
    return rehash(_edit(lines))


def _forge_signature(lines: Lines) -> Lines:
    out = [dict(x) for x in lines]
    cps = [x for x in out if x["type"] == "checkpoint"]
    other = ec.generate_private_key(ec.SECP256R1())
    cps[0]["signature"] = base64.b64encode(
        other.sign(cpfmt.signed_bytes(cps[0]), ec.ECDSA(hashes.SHA256()))
    ).decode()
    return out


def _swap_public_key(lines: Lines) -> Lines:
    """Rewrite history, sign it with the forger's own key, ship that key in the bundle."""
    forger = ec.generate_private_key(ec.SECP256R1())
    pem = forger.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = _rewrite_consistently(lines)
    out[0] = {**out[0], "public_key": pem.decode()}
    hashes_by_seq = {x["seq"]: x["hash"] for x in records(out)}
    for x in out:
        if x["type"] == "checkpoint":
            x["record_hash"] = hashes_by_seq[x["seq"]]
            x["key_sha256"] = cpfmt.key_fingerprint(pem)
            x["signature"] = base64.b64encode(
                forger.sign(cpfmt.signed_bytes(x), ec.ECDSA(hashes.SHA256()))
            ).decode()
    return out


def _drop_middle_checkpoint(lines: Lines) -> Lines:
    cps = [x for x in lines if x["type"] == "checkpoint"]
    return [x for x in lines if x is not cps[1]]


def _forge_header(lines: Lines) -> Lines:
    """An unsigned header claiming a short segment must not make checkpoints disappear."""
    return [{**lines[0], "until": 0, "head": 0, "after": 0}, *_rewrite_consistently(lines)[1:]]


TAMPER: dict[str, tuple[Callable[[Lines], Lines], str]] = {
    "edit a field": (_edit, "seq 4: record edited"),
    "delete a record": (_delete, "seq 4: record(s) 4..4 deleted"),
    "insert a record": (_insert, "seq 5: record inserted, duplicated or reordered"),
    "duplicate a record": (_duplicate, "seq 5: record inserted, duplicated or reordered"),
    "reorder records": (_reorder, "seq 4: record(s) 4..4 deleted, or records reordered"),
    "truncate the tail": (_truncate, "records the checkpoint covers are missing (truncated)"),
    "rewrite the chain consistently": (_rewrite_consistently, "does not match the records"),
    "replace a checkpoint signature": (_forge_signature, "signature does not verify"),
    "swap the public key": (_swap_public_key, "not the trusted public key"),
    "drop a checkpoint from the middle": (_drop_middle_checkpoint, "(checkpoints dropped)"),
    "forge the header and rewrite": (_forge_header, "does not match the records"),
}


def test_duplicate_checkpoint_lines_count_once(api: Api, svc: dict[str, str]) -> None:
    lines, pem = _battery(api, svc)
    cps = [x for x in lines if x["type"] == "checkpoint"]
    assert verify([*lines, cps[0], cps[0]], pem).checkpoints_verified == 3


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tamper_battery_on_the_bundle(api: Api, svc: dict[str, str], case: str) -> None:
    lines, pem = _battery(api, svc)
    assert verify(lines, pem).ok
    tamper, expected = TAMPER[case]
    report = verify(tamper(lines), pem)
    assert not report.ok
    assert any(expected in e for e in report.errors), report.errors


def _db(db_path: Path, *sql: str) -> None:
    with sqlite3.connect(db_path) as db:
        for statement in sql:
            db.execute(statement)


LIVE: dict[str, tuple[tuple[str, ...], str]] = {
    "edit a field": (
        ("UPDATE audit_records SET principal = 'mallory' WHERE seq = 4",),
        "seq 4: record edited",
    ),
    "delete a record": (
        ("DELETE FROM audit_records WHERE seq = 4",),
        "seq 4: record(s) 4..4 deleted",
    ),
    "insert a record": (
        (
            "UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 4",
            "UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1004",
            "INSERT INTO audit_records (seq, v, time, request_id, principal, operation, outcome,"
            " prev_hash, hash) SELECT 4, 1, time, 'forged', principal, 'decrypt', 'ok',"
            " 'forged-prev', 'forged-hash' FROM audit_records WHERE seq = 3",
        ),
        "seq 4: a record before this one was edited",
    ),
    "reorder records": (
        (
            "UPDATE audit_records SET seq = -1 WHERE seq = 4",
            "UPDATE audit_records SET seq = 4 WHERE seq = 5",
            "UPDATE audit_records SET seq = 5 WHERE seq = -1",
        ),
        "seq 4:",
    ),
    "roll back the tail with its checkpoint": (
        (
            "DELETE FROM audit_records WHERE seq > (SELECT max(seq) - 3 FROM audit_records)",
            "DELETE FROM audit_checkpoints WHERE seq = (SELECT max(seq) FROM audit_checkpoints)",
            "UPDATE audit_head SET seq = (SELECT max(seq) FROM audit_records),"
            " hash = (SELECT hash FROM audit_records ORDER BY seq DESC LIMIT 1),"
            " checkpoint_seq = (SELECT max(seq) FROM audit_checkpoints)",
        ),
        "does not reach or agree with your checkpoint",
    ),
    "replace a checkpoint signature": (
        (
            "UPDATE audit_checkpoints SET signature = (SELECT signature FROM audit_checkpoints "
            "ORDER BY seq DESC LIMIT 1) WHERE seq = (SELECT min(seq) FROM audit_checkpoints)",
        ),
        "signature does not verify",
    ),
    "move a checkpoint": (
        ("UPDATE audit_checkpoints SET seq = seq - 1",),
        "signature does not verify",
    ),
}


@pytest.mark.parametrize("case", sorted(LIVE))
def test_tamper_battery_on_the_live_database(
    api: Api, svc: dict[str, str], db_path: Path, case: str
) -> None:
    lines, pem = _battery(api, svc)
    newest = [x for x in lines if x["type"] == "checkpoint"][-1]
    held = {k: v for k, v in newest.items() if k != "type"}  # the auditor kept it
    statements, expected = LIVE[case]
    _db(db_path, *statements)
    report = verify(export(api), pem, through=held)
    assert not report.ok
    assert any(expected in e for e in report.errors), report.errors


def test_since_checkpoint(api: Api, svc: dict[str, str]) -> None:
    traffic(api, svc, 2)
    held = checkpoint(api)
    traffic(api, svc, 2)
    later = checkpoint(api)
    pem = public_key(api)
    segment = export(api, f"?after={held['seq']}")
    assert verify(segment, pem, held).ok
    report = verify(segment, pem)  # without the anchor a bundle must start at seq 1
    assert not report.ok and "not at the first record of the chain" in report.errors[0]
    assert not verify(segment, pem, later).ok  # does not connect to that checkpoint
    with pytest.raises(VerifyInputError):
        verify(segment, pem, {**held, "record_hash": "0" * 64})  # forged anchor


def test_verifier_inputs(api: Api, svc: dict[str, str]) -> None:
    traffic(api, svc, 1)
    checkpoint(api)
    lines, pem = export(api), public_key(api)
    text = [json.dumps(x) for x in lines]
    bad = verify_bundle([*text[:2], "{not json", "[1]", '{"type": "weird"}', *text[2:]], pem)
    assert [e.split(":")[0] for e in bad.errors[:3]] == ["line 3", "line 4", "line 5"]
    assert not verify_bundle(text[1:], pem).ok  # no header
    wrong_type = verify_bundle([*text[:2], json.dumps({**lines[2], "seq": "3"})], pem)
    assert not wrong_type.ok
    for bogus in (
        b"",
        b"not a key",
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ):
        with pytest.raises(VerifyInputError):
            verify_bundle(text, bogus)


def test_export_range_checks(api: Api, svc: dict[str, str]) -> None:
    traffic(api, svc, 1)
    head = api.audit()[-1]["seq"]
    for query in (f"?after={head + 1}", f"?until={head + 5}", "?after=3&until=2", "?after=x"):
        r = api.call("GET", f"/v1/audit/export{query}", api.admin)
        assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request", query


# -- reading with filters, reports ------------------------------------------------------


def test_filters(api: Api, svc: dict[str, str]) -> None:
    traffic(api, svc, 2)
    api.call("POST", "/v1/decrypt", svc, json={"ciphertext": "AAAA"})
    key_id = api.call("GET", "/v1/keys/k", api.admin).json["key_id"]

    def query(q: str) -> Lines:
        r = api.call("GET", f"/v1/audit?limit=1000&{q}", api.admin)
        assert r.status_code == 200, r.json
        return list(r.json["records"])

    assert {r["operation"] for r in query("operation=decrypt")} == {"decrypt"}
    assert len(query("operation=decrypt&outcome=ok")) == 2
    assert [r["outcome"] for r in query("outcome=decryption_failed")] == ["decryption_failed"]
    assert {r["principal"] for r in query("principal=svc")} == {"svc"}
    assert all(r["key_id"] == key_id for r in query(f"key_id={key_id}"))
    assert query("since=2999-01-01") == [] and len(query("until=2999-01-01")) >= 6


def test_report_json_and_csv(api: Api, svc: dict[str, str]) -> None:
    traffic(api, svc, 3)
    api.call("POST", "/v1/decrypt", svc, json={"ciphertext": "AAAA"})
    key_id = api.call("GET", "/v1/keys/k", api.admin).json["key_id"]
    r = api.call("GET", "/v1/audit/report?since=2000-01-01&until=2999-01-01", api.admin)
    assert r.status_code == 200
    key = next(k for k in r.json["keys"] if k["key_id"] == key_id)
    assert key["operations"]["datakey"] == 3 and key["operations"]["decrypt"] == 3
    assert key["unwraps_by_justification"]["service_processing"] == 3
    assert key["escrow_unwraps"] == 0
    principal = next(p for p in r.json["principals"] if p["principal"] == "svc")
    assert principal["failures"] == 1  # the malformed blob names no key, so only here
    text = api.call(
        "GET", "/v1/audit/report?since=2000-01-01&until=2999-01-01&format=csv", api.admin
    )
    assert text.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(text.get_data(as_text=True))))
    row = next(x for x in rows if x["scope"] == "key" and x["name"] == key_id)
    assert (row["decrypt"], row["datakey"], row["unwraps_service_processing"]) == ("3", "3", "3")
    for query in (
        "since=2030-01-01&until=2020-01-01",
        "since=x&until=2020-01-01",
        "until=2020-01-01",
        "since=2020-01-01&until=2030-01-01&format=xml",
    ):
        bad = api.call("GET", f"/v1/audit/report?{query}", api.admin)
        assert bad.status_code == 400, query


# -- retention ----------------------------------------------------------------------------


def test_archive_keeps_the_rest_verifiable(
    api: Api, svc: dict[str, str], app, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    traffic(api, svc, 3)
    cp = checkpoint(api)
    traffic(api, svc, 2)
    exports = app.extensions["kms"].exports
    archive = tmp_path / "archive.jsonl"
    with pytest.raises(InvalidRequest, match="checkpoint"), archive.open("x") as f:
        exports.archive(cp["seq"] - 1, f, archive.open)
    archive.unlink()
    with archive.open("x") as f:
        result = exports.archive(cp["seq"], f, archive.open)
    assert result.through == cp["seq"] and result.records == cp["seq"]
    pem = public_key(api)
    assert verify([json.loads(x) for x in archive.read_text().splitlines()], pem).ok
    live = export(api)
    assert records(live)[0]["seq"] == cp["seq"] + 1
    assert verify(live, pem, cp).ok  # the rest verifies from the archived checkpoint
    assert records(live)[-1]["operation"] == "archive_audit"
    r = api.call("GET", "/v1/audit/export?after=0", api.admin)
    assert r.status_code == 409 and "archived" in r.json["error"]["message"]


def test_max_unsigned_catches_dropped_checkpoints(api: Api, svc: dict[str, str]) -> None:
    """The documented monthly check: from a held checkpoint, with --max-unsigned."""
    traffic(api, svc, 2)
    held = checkpoint(api)
    traffic(api, svc, 4)
    checkpoint(api)
    pem = public_key(api)
    segment = export(api, f"?after={held['seq']}")
    assert verify_bundle([json.dumps(x) for x in segment], pem, held, max_unsigned=5).ok
    forged = [x for x in rehash_from(segment, held) if x["type"] != "checkpoint"]
    forged_records = [x for x in forged if x["type"] == "record"]
    assert verify_bundle([json.dumps(x) for x in forged], pem, held).ok  # tail looks unsigned
    report = verify_bundle([json.dumps(x) for x in forged], pem, held, max_unsigned=5)
    assert not report.ok and "checkpoints were dropped" in report.errors[0]
    assert len(forged_records) > 5


def rehash_from(lines: Lines, held: dict[str, Any]) -> Lines:
    """Rewrite a segment after a held checkpoint (principal changed, hashes recomputed)."""
    prev = held["record_hash"]
    out = []
    for x in lines:
        if x["type"] == "record":
            body = {k: v for k, v in x.items() if k not in ("type", "hash")}
            body["principal"], body["prev_hash"] = "mallory", prev
            x = {"type": "record", **body, "hash": audit_record.record_hash(body)}
            prev = x["hash"]
        out.append(x)
    return out

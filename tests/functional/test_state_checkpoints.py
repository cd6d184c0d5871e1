"""Freshness of sealed rows at checkpoints and offline (issue 15, item 2): every checkpoint
carries the sealed state, verified against the HSM state anchor, so a row rolled back in
the database that nobody used is caught at the next checkpoint at the latest (nothing is
signed over it); ``kms audit export-state`` writes the rows at a signed state change and
``kms audit verify --state`` checks them against the bundle offline. Real SoftHSM token,
real SQLite, the real ``kms`` command (run over this test's database)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.backends.storage import schema as t
from kms.errors import Conflict
from kms.formats import checkpoint as cpfmt
from kms.formats.state import public_digest
from kms.metrics import STATE_REFUSED
from kms.services.audit import AuditTrail
from kms.services.audit_events import local_event
from kms.services.audit_verify import verify_bundle
from kms.services.clock import SystemClock
from kms.services.state_export import RETRIES, export_state
from tests.helpers import Api, run_kms

ROLLED_BACK = "a row was rolled back, inserted or deleted in the database"
DIFFERS = "a sealed row differs (rolled back, inserted or deleted)"


def _checkpoint(api: Api) -> Any:
    return api.call("POST", "/v1/audit/checkpoints", api.admin, json={})


def _checkpoints(api: Api) -> list[dict[str, Any]]:
    r = api.call("GET", "/v1/audit/checkpoints?limit=1000", api.admin)
    assert r.status_code == 200
    return list(r.json["checkpoints"])


def _public_key(api: Api) -> bytes:
    return bytes(api.call("GET", "/v1/audit/public-key", api.admin).data)


def _bundle(api: Api) -> list[str]:
    r = api.call("GET", "/v1/audit/export", api.admin)
    assert r.status_code == 200
    return [line.decode() for line in r.get_data().splitlines()]


def _grant(api: Api, key_id: str, svc: dict[str, str], ops: list[str]) -> None:
    r = api.call(
        "POST",
        f"/v1/keys/{key_id}/grants",
        api.admin,
        json={"principal": svc["X-Name"], "operations": ops},
    )
    assert r.status_code == 200, r.json


def _grant_row(storage: SqlStorage, key_id: str) -> dict[str, Any]:
    with storage.reader() as tx:
        row = tx._c.execute(sa.select(t.grants).where(t.grants.c.key_id == key_id)).one()
    return dict(row._asdict())


def _put_grant_row(storage: SqlStorage, row: dict[str, Any]) -> None:
    """The database writer: a grant row written outside the server (no state change is
    logged, the HSM anchor does not move)."""
    g = t.grants.c
    with storage.transaction() as tx:
        tx._c.execute(
            sa.update(t.grants)
            .where(g.key_id == row["key_id"], g.principal_id == row["principal_id"])
            .values(operations=row["operations"], seal=row["seal"])
        )


@pytest.fixture
def revoked(api: Api, storage: SqlStorage) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A key whose service grant lost ``decrypt``: its id, the grant row before (an older
    sealed copy, as in a backup) and after."""
    svc = api.principal("service")
    key_id = api.key(grant=svc, ops=("encrypt", "decrypt"))
    before = _grant_row(storage, key_id)
    _grant(api, key_id, svc, ["encrypt"])
    after = _grant_row(storage, key_id)
    assert before["seal"] != after["seal"] and before["operations"] != after["operations"]
    return key_id, before, after


# -- signing -------------------------------------------------------------------------------


def test_a_checkpoint_carries_the_verified_sealed_state(api: Api, storage: SqlStorage) -> None:
    svc = api.principal("service")
    api.key(grant=svc)
    r = _checkpoint(api)
    assert r.status_code == 201, r.json
    cp = dict(r.json)
    with storage.reader() as tx:
        n, entries = tx.state_seq(), list(tx.sealed_rows())
    assert n > 0 and {kind for kind, _, _ in entries} >= {"principal", "token", "key", "grant"}
    assert cp["v"] == 2
    assert (cp["state_seq"], cp["state_sha256"]) == (n, public_digest(entries))
    cpfmt.verify(cp, cpfmt.load_public_key(_public_key(api)))
    assert _checkpoints(api)[-1] == cp  # stored and listed as signed
    report = verify_bundle(_bundle(api), _public_key(api))
    assert report.ok and report.checkpoints_verified == 1, report.summary()


def test_format_1_checkpoints_signed_before_still_list_and_verify(
    api: Api, storage: SqlStorage, hsm: Pkcs11Hsm
) -> None:
    """A checkpoint signed by a process that did not follow the sealed state (format 1, as
    every checkpoint before format 2) is stored without state and verifies beside the
    format 2 checkpoints signed after it."""
    old = AuditTrail(storage, SystemClock(), hsm)
    assert old.sealed_state is None
    old.record([local_event("before_freshness", None)])
    v1 = old.checkpoint()
    assert v1 is not None and v1["v"] == 1 and "state_seq" not in v1
    api.key()
    r = _checkpoint(api)
    assert r.status_code == 201 and r.json["v"] == 2
    listed = _checkpoints(api)
    assert [cp["v"] for cp in listed] == [1, 2]
    assert listed[0] == v1  # no state keys on a format 1 row
    pem = _public_key(api)
    for cp in listed:
        cpfmt.verify(cp, cpfmt.load_public_key(pem))
    report = verify_bundle(_bundle(api), pem)
    assert report.ok and report.checkpoints_verified == 2, report.summary()


def test_a_rolled_back_unused_grant_is_refused_at_the_next_checkpoint(
    api: Api, storage: SqlStorage, revoked: tuple[str, dict[str, Any], dict[str, Any]]
) -> None:
    """The database writer puts back the older sealed copy of a grant (decrypt revoked
    since). Nobody uses it; the next checkpoint refuses to sign over it."""
    _, before, after = revoked
    r = _checkpoint(api)
    assert r.status_code == 201, r.json  # the untouched database checkpoints fine
    signed = dict(r.json)
    refused_before = STATE_REFUSED._value.get()

    _put_grant_row(storage, before)
    r = _checkpoint(api)
    assert (r.status_code, r.json["error"]["code"]) == (503, "state_refused")
    assert STATE_REFUSED._value.get() > refused_before
    assert _checkpoints(api)[-1] == signed  # nothing was signed over the rolled-back row
    record = api.audit()[-1]
    assert (record["operation"], record["outcome"]) == ("create_checkpoint", "state_refused")
    assert ROLLED_BACK in record["detail"]

    _put_grant_row(storage, after)  # the current row back: the same state signs again
    r = _checkpoint(api)
    assert r.status_code == 201, r.json
    assert (r.json["state_seq"], r.json["state_sha256"]) == (
        signed["state_seq"],
        signed["state_sha256"],
    )


# -- the state export and the offline verifier ----------------------------------------------


def _racing(app: Any, api: Api, changes: int) -> AuditTrail:
    """The app's trail, where another request changes a sealed row (creates a key, in a
    thread of its own) right after each of the first ``changes`` checkpoints is signed."""
    trail: AuditTrail = app.extensions["kms"].audit
    sign = trail.checkpoint
    done: list[str] = []

    def checkpoint_then_change(*args: Any) -> Any:
        cp = sign(*args)
        if len(done) < changes:
            writer = threading.Thread(target=lambda: done.append(api.key()))
            writer.start()
            writer.join()
        return cp

    trail.checkpoint = checkpoint_then_change  # type: ignore[method-assign,assignment]
    return trail


def test_export_state_tries_again_after_a_concurrent_change(
    app: Any, api: Api, storage: SqlStorage
) -> None:
    snapshot = export_state(_racing(app, api, changes=1))
    with storage.reader() as tx:
        n, entries = tx.state_seq(), list(tx.sealed_rows())
    assert snapshot.state_seq == n == snapshot.checkpoint["state_seq"]
    assert json.loads(snapshot.data)["rows"] == sorted(list(e) for e in entries)
    tries = [r["detail"] for r in api.audit() if r["operation"] == "export_state"]
    assert tries == ["attempt 1", "attempt 2"]


def test_export_state_gives_up_if_the_state_keeps_changing(app: Any, api: Api) -> None:
    with pytest.raises(Conflict, match="kept changing"):
        export_state(_racing(app, api, changes=RETRIES + 1))
    records = [r for r in api.audit() if r["operation"] == "export_state"]
    assert [r["outcome"] for r in records] == ["ok"] * (RETRIES + 1) + ["conflict"]


def _kms(db_path: Path, *args: str) -> tuple[int, str, str]:
    """The real ``kms`` command on this test's database (and the session's token)."""
    done = run_kms(*args, env={"KMS_DATABASE_URL": f"sqlite:///{db_path}"})
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def _export_state(data_dir: Path, db_path: Path, out: Path) -> tuple[int, str]:
    code, _, err = _kms(
        db_path, "audit", "export-state", "--data-dir", str(data_dir), "--out", str(out)
    )
    return code, err


def _verify(db_path: Path, bundle: Path, pem: Path, state: Path) -> tuple[int, str]:
    code, out, err = _kms(
        db_path, "audit", "verify", str(bundle), "--public-key", str(pem), "--state", str(state)
    )
    return code, out + err


def _edit(path: Path, out: Path, change: Any) -> Path:
    body = json.loads(path.read_text())
    change(body)
    out.write_text(json.dumps(body))
    return out


def test_export_state_and_verify_state(
    api: Api,
    storage: SqlStorage,
    data_dir: Path,
    db_path: Path,
    tmp_path: Path,
    revoked: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    key_id, before, after = revoked
    state = tmp_path / "state.json"
    code, err = _export_state(data_dir, db_path, state)
    assert code == 0, err
    with storage.reader() as tx:
        n, entries = tx.state_seq(), list(tx.sealed_rows())
    exported = json.loads(state.read_text())
    assert exported == {
        "v": 1,
        "state_seq": n,
        "state_sha256": public_digest(entries),
        "rows": sorted([list(e) for e in entries]),
    }
    signed = _checkpoints(api)[-1]
    assert signed["state_seq"] == n
    assert f"sealed state at change {n}: {len(entries)} rows" in err
    assert f"checkpoint at seq {signed['seq']}" in err
    records = api.audit()
    assert records[signed["seq"] - 1]["operation"] == "export_state"  # signed with it

    bundle, pem = tmp_path / "bundle.jsonl", tmp_path / "audit.pem"
    bundle.write_text("".join(line + "\n" for line in _bundle(api)))
    pem.write_bytes(_public_key(api))
    code, out = _verify(db_path, bundle, pem, state)
    assert code == 0, out
    assert (
        f"state export: {len(entries)} sealed rows at state change {n} match the signed "
        f"checkpoint at seq {signed['seq']}"
    ) in out
    assert out.rstrip().endswith("VERIFIED")

    ident = json.dumps([key_id, after["principal_id"]], separators=(",", ":"))
    current = ["grant", ident, after["seal"]]
    assert current in exported["rows"]

    def older(body: dict[str, Any]) -> None:  # the row as an older backup had it
        body["rows"][body["rows"].index(current)] = ["grant", ident, before["seal"]]

    def removed(body: dict[str, Any]) -> None:
        body["rows"].remove(current)

    def added(body: dict[str, Any]) -> None:
        body["rows"].append(["grant", json.dumps(["k-minted", 1]).replace(" ", ""), "ab" * 32])

    def older_and_rehashed(body: dict[str, Any]) -> None:  # a careful forger
        older(body)
        body["state_sha256"] = public_digest(tuple(row) for row in body["rows"])

    for change in (older, removed, added, older_and_rehashed):
        code, out = _verify(db_path, bundle, pem, _edit(state, tmp_path / "x.json", change))
        assert code == 1, (change.__name__, out)
        assert (
            f"ERROR: the state export does not match the signed checkpoint at state change "
            f"{n}: {DIFFERS}; checkpoint at seq {signed['seq']}"
        ) in out, change.__name__
        edited = "the export's own state_sha256 does not match its rows either"
        assert (edited in out) is (change is not older_and_rehashed)
        assert out.rstrip().endswith("FAILED")

    def later(body: dict[str, Any]) -> None:
        body["state_seq"] += 100

    code, out = _verify(db_path, bundle, pem, _edit(state, tmp_path / "x.json", later))
    assert code == 1, out
    assert (
        f"the state export is at state change {n + 100}, but no signed checkpoint of the "
        f"bundle is at that change (its checkpoints are at state change {n})"
    ) in out

    def only_the_header(body: dict[str, Any]) -> None:  # rows intact, the digest edited
        body["state_sha256"] = "0" * 64

    code, out = _verify(db_path, bundle, pem, _edit(state, tmp_path / "x.json", only_the_header))
    assert code == 1 and "state_sha256 does not match its own rows" in out


def test_export_state_refuses_a_rolled_back_database(
    api: Api,
    storage: SqlStorage,
    data_dir: Path,
    db_path: Path,
    tmp_path: Path,
    revoked: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    _, before, _ = revoked
    _put_grant_row(storage, before)
    out = tmp_path / "state.json"
    code, err = _export_state(data_dir, db_path, out)
    assert code == 1
    assert "state_refused" in err and "rolled back, inserted or deleted" in err
    assert not out.exists()  # no file for a state that was not exported
    record = api.audit()[-1]
    assert (record["operation"], record["outcome"]) == ("export_state", "state_refused")


def test_bad_input_to_the_cli_gives_a_clear_error(
    api: Api, data_dir: Path, db_path: Path, tmp_path: Path
) -> None:
    api.key()
    state = tmp_path / "state.json"
    assert _export_state(data_dir, db_path, state)[0] == 0
    bundle, pem = tmp_path / "bundle.jsonl", tmp_path / "audit.pem"
    bundle.write_text("".join(line + "\n" for line in _bundle(api)))
    pem.write_bytes(_public_key(api))
    good = json.loads(state.read_text())
    first = good["rows"][0]
    cases = {
        "not JSON": (b"{rows", "--state: not valid JSON"),
        "a list": (b"[]", "--state: not a JSON object"),
        "bad hex": (
            {**good, "rows": [[*first[:2], "XY" * 32], *good["rows"][1:]]},
            "--state: row 1: seal must be 64 lowercase hex digits or '-'",
        ),
        "duplicate": (
            {**good, "rows": [*good["rows"], first]},
            f"--state: row {len(good['rows']) + 1}: duplicates row 1",
        ),
        "wrong types": ({**good, "state_seq": "3"}, "--state: state_seq must be an integer"),
        "version": ({**good, "v": 2}, "--state: unknown format version 2"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / "bad.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        code, out = _verify(db_path, bundle, pem, path)
        assert code == 2, (name, out)
        assert f"Error: {message}" in out, (name, out)

    # export-state never overwrites a file, and leaves it as it was
    state.write_text("keep me")
    code, err = _export_state(data_dir, db_path, state)
    assert code == 1 and "File exists" in err
    assert state.read_text() == "keep me"
    code, _, err = _kms(db_path, "audit", "export-state")
    assert code == 2 and "--data-dir" in err

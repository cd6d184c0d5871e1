"""Rotation policy, version retirement, usage tracking, scheduled deletion and
crypto-shredding, through the Flask app against the real SoftHSM token, with a clock the
test moves."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kms import config
from kms.app import Services, create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.services.audit_events import Caller
from kms.services.principals import PrincipalService
from kms.services.rotation import SCHEDULER
from tests.helpers import Api, ManualClock

DAY = 86400


@dataclass
class World:
    api: Api
    clock: ManualClock
    svc: dict[str, str]
    services: Services
    db_path: Path

    def run_due(self) -> Any:
        return self.services.keys.run_due(Caller("test-run", SCHEDULER))

    def key(self, ref: str) -> dict[str, Any]:
        r = self.api.call("GET", f"/v1/keys/{ref}", self.api.admin)
        assert r.status_code == 200, r.json
        return dict(r.json)

    def config(self, ref: str, **body: Any) -> Any:
        return self.api.call("POST", f"/v1/keys/{ref}/config", self.api.admin, json=body)

    def datakey(self, ref: str) -> dict[str, Any]:
        r = self.api.call("POST", f"/v1/keys/{ref}/datakey", self.svc, json={})
        assert r.status_code == 200, r.json
        return dict(r.json)

    def decrypt(self, blob: str) -> Any:
        return self.api.call("POST", "/v1/decrypt", self.svc, json={"ciphertext": blob})

    def delete_after_waiting(self, ref: str, key_id: str, blob: str) -> None:
        """Schedule deletion with the shortest wait (7 days): refused but kept while
        pending, not destroyed a minute early, destroyed by the scheduler a minute late."""
        body = {"pending_days": 7}
        r = self.api.call("POST", f"/v1/keys/{ref}/schedule-deletion", self.api.admin, json=body)
        assert r.json["state"] == "pending_deletion"
        assert self.decrypt(blob).json["error"]["code"] == "key_state"  # refused, kept
        self.clock.advance(7 * DAY - 60)
        assert self.run_due().destroyed == []
        self.clock.advance(120)
        run = self.run_due()
        assert run.destroyed == [key_id] and not run.failed
        assert self.key(key_id)["state"] == "destroyed"


@pytest.fixture
def world(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, db_path: Path
) -> Iterator[World]:
    clock = ManualClock()
    app = create_app(settings, hsm=hsm, storage=storage, clock=clock)
    principals: PrincipalService = app.extensions["kms"].principals
    token = principals.bootstrap_admin("admin")
    assert token
    api = Api(app.test_client(), token)
    yield World(api, clock, api.principal("service", "svc"), app.extensions["kms"], db_path)


def test_rotation_period_makes_a_key_due_and_the_scheduler_rotates_it_once(w: World) -> None:
    w.api.key("due", grant=w.svc)
    w.api.key("later", grant=w.svc)
    w.api.key("never", grant=w.svc)
    assert w.config("due", rotation_period_days=1).status_code == 200
    later = w.config("later", rotation_period_days=30).json
    assert later["rotation_period_days"] == 30
    assert later["next_rotation"] == "2026-12-01T09:00:00Z"  # created 2026-11-01 09:00
    assert w.key("never")["next_rotation"] is None
    assert w.services.keys.rotation_due_count() == 0
    w.clock.advance(DAY)
    assert w.services.keys.rotation_due_count() == 1
    run = w.run_due()
    assert [v for _, v in run.rotated] == [2] and not run.failed and not run.destroyed
    assert w.key("due")["current_version"] == 2
    assert w.key("due")["next_rotation"] == "2026-11-03T09:00:00Z"
    assert w.key("later")["current_version"] == 1 and w.key("never")["current_version"] == 1
    assert w.run_due().rotated == []  # nothing due any more
    records = [r for r in w.api.audit() if r["operation"] == "rotate_key"]
    assert len(records) == 1 and records[0]["principal"] == "system:scheduler"
    assert records[0]["outcome"] == "ok" and records[0]["key_version"] == 2


def test_disabled_and_pending_deletion_keys_are_not_rotated(w: World) -> None:
    for alias in ("off", "going"):
        w.api.key(alias, grant=w.svc)
        assert w.config(alias, rotation_period_days=1).status_code == 200
    assert w.api.call("POST", "/v1/keys/off/disable", w.api.admin).status_code == 200
    going = w.api.call("POST", "/v1/keys/going/schedule-deletion", w.api.admin, json={})
    assert going.status_code == 200
    w.clock.advance(2 * DAY)
    assert w.run_due().rotated == []
    for alias in ("off", "going"):
        r = w.api.call("POST", f"/v1/keys/{alias}/rotate", w.api.admin)
        assert r.status_code == 409 and r.json["error"]["code"] == "key_state"
        assert w.key(alias)["current_version"] == 1
        assert w.key(alias)["next_rotation"] is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"rotation_period_days": 0},
        {"rotation_period_days": -1},
        {"rotation_period_days": 3651},
        {"rotation_period_days": "7"},
        {"rotation_period_days": True},
        {"rotation_period_days": 1.5},
        {"rotation_period_days": 10**40},
        {"min_decryption_version": 0},
        {"min_decryption_version": 3},
        {"min_decryption_version": "2"},
        {"min_decryption_version": None},
        {"rotation_period_days": 7, "min_decryption_version": 3},  # all or nothing
        {"retention": 7},
    ],
)
def test_bad_config_is_refused_and_changes_nothing(w: World, body: dict[str, Any]) -> None:
    w.api.key("k", grant=w.svc)
    assert w.api.call("POST", "/v1/keys/k/rotate", w.api.admin).status_code == 200
    assert w.config("k", min_decryption_version=2).status_code == 200
    before = w.key("k")
    records = len(w.api.audit())
    r = w.config("k", **body)
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request", r.json
    assert w.key("k") == before
    assert len(w.api.audit()) == records + 1  # only the record of the refusal


def test_min_decryption_version_only_moves_forward(w: World) -> None:
    w.api.key("k", grant=w.svc)
    for _ in range(2):
        assert w.api.call("POST", "/v1/keys/k/rotate", w.api.admin).status_code == 200
    assert w.config("k", min_decryption_version=3).json["min_decryption_version"] == 3
    back = w.config("k", min_decryption_version=2)
    assert back.status_code == 400 and "forward" in back.json["error"]["message"]
    assert w.config("k", min_decryption_version=3).status_code == 200  # unchanged is fine
    off = w.config("k", rotation_period_days=None)
    assert off.status_code == 200 and off.json["rotation_period_days"] is None


def test_only_admins_configure(w: World) -> None:
    w.api.key("k", grant=w.svc)
    auditor = w.api.principal("auditor")
    for who in (w.svc, auditor, {}):
        r = w.api.call("POST", "/v1/keys/k/config", who, json={"rotation_period_days": 7})
        assert r.status_code in (401, 403)
    assert w.key("k")["rotation_period_days"] is None
    usage = w.api.call("GET", "/v1/keys/k/usage", auditor)
    assert usage.status_code == 200  # auditors read usage
    assert w.api.call("GET", "/v1/keys/k/usage", w.svc).status_code == 403


def test_retired_version_is_refused_and_usage_shows_when_it_stopped(w: World) -> None:
    w.api.key("k", grant=w.svc)
    old = w.datakey("k")
    assert w.decrypt(old["ciphertext"]).status_code == 200
    w.clock.advance(DAY)
    assert w.decrypt(old["ciphertext"]).status_code == 200
    assert w.api.call("POST", "/v1/keys/k/rotate", w.api.admin).status_code == 200
    new = w.datakey("k")
    assert new["key_version"] == 2
    rewrapped = w.api.call("POST", "/v1/rewrap", w.svc, json={"ciphertext": old["ciphertext"]})
    assert rewrapped.json["key_version"] == 2

    usage = w.api.call("GET", "/v1/keys/k/usage", w.api.admin).json
    v1, v2 = usage["versions"]
    assert (v1["version"], v1["decrypts"], v1["retired"]) == (1, 3, False)  # 2 decrypts, 1 rewrap
    assert v1["last_used"].startswith("2026-11-02")
    assert (v2["version"], v2["decrypts"], v2["last_used"]) == (2, 0, None)
    assert usage["days"] == [
        {"day": "2026-11-01", "version": 1, "decrypts": 1},
        {"day": "2026-11-02", "version": 1, "decrypts": 2},
    ]

    retired = w.api.call(
        "POST", "/v1/keys/k/config", w.api.admin, json={"min_decryption_version": 2}
    )
    assert retired.status_code == 200
    refused = w.decrypt(old["ciphertext"])
    assert refused.status_code == 409 and refused.json["error"]["code"] == "key_version_retired"
    assert "plaintext" not in refused.json
    again = w.api.call("POST", "/v1/rewrap", w.svc, json={"ciphertext": old["ciphertext"]})
    assert again.json["error"]["code"] == "key_version_retired"
    assert w.decrypt(rewrapped.json["ciphertext"]).json["plaintext"] == old["plaintext"]
    assert w.decrypt(new["ciphertext"]).status_code == 200
    last = [r for r in w.api.audit() if r["operation"] == "decrypt"][-3]
    assert (last["outcome"], last["key_version"]) == ("key_version_retired", 1)
    usage = w.api.call("GET", "/v1/keys/k/usage", w.api.admin).json
    assert usage["versions"][0]["retired"] is True and usage["versions"][0]["decrypts"] == 3


def test_retirement_during_a_request_is_caught_at_commit(w: World) -> None:
    """The commit-time re-check reads min_decryption_version fresh."""
    w.api.key("k", grant=w.svc)
    old = w.datakey("k")
    assert w.api.call("POST", "/v1/keys/k/rotate", w.api.admin).status_code == 200
    crypto = w.services.crypto
    real_open = crypto._open

    def open_then_retire(*args: Any) -> bytes:
        plaintext = real_open(*args)
        assert w.config("k", min_decryption_version=2).status_code == 200
        return plaintext

    crypto._open = open_then_retire  # type: ignore[method-assign]
    try:
        r = w.decrypt(old["ciphertext"])
    finally:
        crypto._open = real_open  # type: ignore[method-assign]
    assert r.status_code == 409 and r.json["error"]["code"] == "key_version_retired"
    assert "plaintext" not in r.json


def test_scheduled_deletion_destroys_material_after_the_waiting_period(w: World) -> None:
    key_id = w.api.key("k", grant=w.svc)
    blob = w.datakey("k")["ciphertext"]
    assert w.api.call("POST", "/v1/keys/k/rotate", w.api.admin).status_code == 200
    with sqlite3.connect(w.db_path) as db:
        material = [bytes(r[0]) for r in db.execute("SELECT wrapped_kek FROM key_versions")]
    assert len(material) == 2
    w.delete_after_waiting("k", key_id, blob)

    for path, body in (
        ("/v1/decrypt", {"ciphertext": blob}),
        ("/v1/rewrap", {"ciphertext": blob}),
        ("/v1/keys/k/datakey", {}),
    ):
        refused = w.api.call("POST", path, w.svc, json=body)
        assert refused.status_code == 409 and refused.json["error"]["code"] == "key_state"
    for action in ("enable", "cancel-deletion", "rotate", "disable"):
        r = w.api.call("POST", f"/v1/keys/k/{action}", w.api.admin, json={})
        assert r.status_code == 409, action
    assert w.config("k", rotation_period_days=7).status_code == 409
    with sqlite3.connect(w.db_path) as db:
        assert db.execute("SELECT count(*) FROM key_versions").fetchone() == (0,)
    # Not in the database file or its WAL either: secure_delete zeroed the rows and the
    # WAL was truncated.
    raw = b"".join(p.read_bytes() for p in w.db_path.parent.glob(w.db_path.name + "*"))
    assert all(m not in raw for m in material)
    destroyed = [r for r in w.api.audit() if r["operation"] == "destroy_key"]
    assert len(destroyed) == 1 and destroyed[0]["detail"] == "versions erased: 2"


def test_cancelled_deletion_keeps_the_key(w: World) -> None:
    w.api.key("k", grant=w.svc)
    blob = w.datakey("k")["ciphertext"]
    w.api.call("POST", "/v1/keys/k/schedule-deletion", w.api.admin, json={"pending_days": 7})
    w.clock.advance(DAY)
    assert w.api.call("POST", "/v1/keys/k/cancel-deletion", w.api.admin).json["state"] == "disabled"
    w.clock.advance(30 * DAY)
    assert w.run_due().destroyed == []
    assert w.api.call("POST", "/v1/keys/k/enable", w.api.admin).status_code == 200
    assert w.decrypt(blob).status_code == 200


def test_a_scheduler_run_that_fails_halfway_leaves_no_half_rotated_key(w: World) -> None:
    ids = [w.api.key(f"k{i}", grant=w.svc) for i in range(3)]
    for i in range(3):
        assert w.config(f"k{i}", rotation_period_days=1).status_code == 200
    w.clock.advance(DAY)
    # A real database refusal for the second key's new version row only.
    with sqlite3.connect(w.db_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON key_versions "
            f"WHEN NEW.key_id = '{ids[1]}' BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    run = w.run_due()
    assert sorted(k for k, _ in run.rotated) == sorted([ids[0], ids[2]])
    assert run.failed == [(ids[1], "storage_unavailable")]
    with sqlite3.connect(w.db_path) as db:
        rows = dict(db.execute("SELECT key_id, count(*) FROM key_versions GROUP BY key_id"))
        current = dict(db.execute("SELECT key_id, current_version FROM keys"))
    assert rows == current == {ids[0]: 2, ids[1]: 1, ids[2]: 2}  # every version is usable
    failed = [r for r in w.api.audit() if r["operation"] == "rotate_key" and r["outcome"] != "ok"]
    assert [(r["key_id"], r["outcome"]) for r in failed] == [(ids[1], "storage_unavailable")]
    with sqlite3.connect(w.db_path) as db:
        db.execute("DROP TRIGGER refuse")
    assert w.run_due().rotated == [(ids[1], 2)]  # the next run finishes the job
    assert w.decrypt(w.datakey(f"k{1}")["ciphertext"]).status_code == 200


@pytest.fixture
def w(world: World) -> World:
    return world

"""The escrow procedure end to end (real SoftHSM, real Ed25519 signatures, a settable
clock for waiting periods and expiry), and every refusal the issue lists."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms import config
from kms.app import create_app
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from kms.backends.storage import schema as t
from kms.errors import Conflict
from kms.formats import escrow as escrowfmt
from kms.services.principals import PrincipalService
from tests import escrow_support
from tests.helpers import SECRET, Api, Receiver, unb64
from tests.helpers import ManualClock as Clock


def _raw_public_key() -> bytes:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclasses.dataclass
class World:
    api: Api
    clock: Clock
    svc: dict[str, str]
    police: dict[str, str]
    custodians: dict[str, tuple[dict[str, str], Ed25519PrivateKey]]
    blobs: list[dict[str, Any]]  # datakey answers under key "records", context patient=p<i>
    key_id: str
    services: Any
    receiver: Receiver

    def deliver(self) -> None:
        """Run the notification loop once (the server runs it every second)."""
        self.services.notifier.deliver_due()

    def file(self, **changes: Any) -> dict[str, Any]:
        body = {
            "legal_basis": "Court order 2026/117, art. 57 code of criminal procedure",
            "reference": "INV-2026-117",
            "justification": "legal_request",
            "scope": {"keys": ["records"], "context": {"patient": "p0"}},
            "max_unwraps": 2,
            "expires_in_seconds": 7 * 86400,
            **changes,
        }
        r = self.api.call("POST", "/v1/escrow/cases", self.police, json=body)
        assert r.status_code == 201, r.json
        return dict(r.json)

    def case(self, case_id: str) -> dict[str, Any]:
        r = self.api.call("GET", f"/v1/escrow/cases/{case_id}", self.api.admin)
        assert r.status_code == 200, r.json
        return dict(r.json)

    def decide(
        self,
        case_id: str,
        who: str,
        decision: str = "approve",
        case: dict[str, Any] | None = None,
        key: Ed25519PrivateKey | None = None,
    ) -> Any:
        case = case or self.case(case_id)
        return escrow_support.decide(self.api, self.custodians, case, who, decision, key)

    def unwrap(self, case_id: str, i: int = 0, **changes: Any) -> Any:
        body = {
            "ciphertext": self.blobs[i]["ciphertext"],
            "context": {"patient": f"p{i}"},
            "justification": "legal_request",
            "case_id": case_id,
            **changes,
        }
        return self.api.call("POST", "/v1/decrypt", self.police, json=body)

    def enrol(self, name: str, group: str, endorser: str) -> None:
        """Register custodian ``name`` in ``group``, endorsed by member ``endorser``."""
        escrow_support.enrol(self.api, self.custodians, name, group, endorser)

    def refused(self, response: Any, status: int = 403) -> None:
        assert response.status_code == status, response.json
        assert "plaintext" not in response.json


@pytest.fixture
def world(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> Iterator[World]:
    clock = Clock()
    escrow_settings = dataclasses.replace(
        settings,
        escrow_quorum=2,
        escrow_required_groups=frozenset({"keyholder", "data_owner"}),
        escrow_veto_groups=frozenset({"data_owner"}),
        escrow_groups=frozenset({"legal"}),
        escrow_waiting_period_seconds=3600,
        escrow_approval_ttl_seconds=86400,
        escrow_webhook_url=receiver.url,
        escrow_webhook_secret=SECRET,
    )
    app = create_app(escrow_settings, hsm=hsm, storage=storage, clock=clock)
    principals: PrincipalService = app.extensions["kms"].principals
    token = principals.bootstrap_admin("admin")
    assert token
    api = Api(app.test_client(), token)
    svc = api.principal("service", "svc")
    key_id = api.key("records", grant=svc)
    api.key("other", grant=svc)
    blobs = [
        api.call(
            "POST", "/v1/keys/records/datakey", svc, json={"context": {"patient": f"p{i}"}}
        ).json
        for i in range(3)
    ]
    police = api.principal("requester", "police")
    custodians = {}
    for name, group in (("kh-officer", "keyholder"), ("dpo", "data_owner"), ("legal", "legal")):
        headers = api.principal("custodian", name)
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        # pinned at deployment (kms init --custodian): the API adds no group's first member
        assert app.extensions["kms"].custodians.pin_custodian(name, group, raw) is None
        custodians[name] = (headers, key)
    yield World(api, clock, svc, police, custodians, blobs, key_id, app.extensions["kms"], receiver)


def test_the_whole_procedure(world: World) -> None:
    case = world.file()
    assert case["state"] == "pending" and len(base64.b64decode(case["digest"])) == 32
    cid = case["case_id"]
    world.refused(world.unwrap(cid))  # zero approvals
    assert world.decide(cid, "kh-officer").json["state"] == "pending"
    world.refused(world.unwrap(cid))  # one approval is not a quorum
    approved = world.decide(cid, "dpo").json
    assert approved["state"] == "approved" and approved["active_from"] is None
    world.clock.advance(7200)
    assert world.case(cid)["state"] == "approved"  # the data owner was not told yet
    world.deliver()
    told = world.receiver.accepted[-1]["body"]["case"]
    assert (told["case_id"], told["state"]) == (cid, "approved")
    assert world.case(cid)["active_from"] > told["expires_at"][:0]  # the clock started
    world.refused(world.unwrap(cid))  # waiting period: the data owner may still contest
    world.clock.advance(3601)
    assert world.case(cid)["state"] == "active"
    ok = world.unwrap(cid)
    assert ok.status_code == 200 and ok.json["plaintext"] == world.blobs[0]["plaintext"]
    record = world.api.audit()[-1]
    assert (record["operation"], record["case_id"], record["justification"]) == (
        "decrypt",
        cid,
        "legal_request",
    )
    assert world.unwrap(cid).status_code == 200
    world.refused(world.unwrap(cid))  # max_unwraps = 2
    assert world.case(cid)["unwraps_used"] == 2
    closed = world.api.call("POST", f"/v1/escrow/cases/{cid}/close", world.police, json={})
    assert closed.json["state"] == "closed"
    world.refused(world.unwrap(cid))
    ops = [r["operation"] for r in world.api.audit() if r["case_id"] == cid]
    for op in (
        "file_case",
        "approve_case",
        "case_approved",
        "case_active",
        "decrypt",
        "close_case",
    ):
        assert op in ops, op


def test_quorum_needs_every_required_group(world: World) -> None:
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    assert world.decide(cid, "legal").json["state"] == "pending"  # no data_owner approval yet
    assert world.decide(cid, "dpo").json["state"] == "approved"


def test_duplicate_approval_counts_once(world: World) -> None:
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    again = world.decide(cid, "kh-officer")
    assert again.status_code == 409
    assert world.case(cid)["approvals"] == ["kh-officer"]


def test_amendment_invalidates_earlier_approvals(world: World) -> None:
    cid = world.file()["case_id"]
    v1 = world.case(cid)
    world.decide(cid, "kh-officer")
    amended = world.api.call(
        "PUT",
        f"/v1/escrow/cases/{cid}",
        world.police,
        json={
            "legal_basis": "Court order 2026/117",
            "reference": "INV-2026-117",
            "justification": "legal_request",
            "scope": {"keys": ["records", "other"]},
            "max_unwraps": 5,
            "expires_in_seconds": 86400,
        },
    )
    assert amended.json["version"] == 2 and amended.json["digest"] != v1["digest"]
    stale = world.decide(cid, "dpo", case=v1)  # signed over version 1
    world.refused(stale)
    assert world.case(cid)["approvals"] == []  # kh-officer approved v1 only
    world.decide(cid, "kh-officer")
    assert world.decide(cid, "dpo").json["state"] == "approved"


def test_unregistered_wrong_and_revoked_keys(world: World) -> None:
    cid = world.file()["case_id"]
    stranger = world.api.principal("custodian", "stranger")
    world.custodians["stranger"] = (stranger, Ed25519PrivateKey.generate())
    world.refused(world.decide(cid, "stranger"))  # never registered
    world.refused(world.decide(cid, "dpo", key=Ed25519PrivateKey.generate()))  # not dpo's key
    world.decide(cid, "kh-officer")
    world.enrol("kh-officer-2", "keyholder", endorser="kh-officer")  # the group stays staffed
    assert world.api.call("DELETE", "/v1/custodians/kh-officer", world.api.admin).status_code == 200
    assert world.case(cid)["approvals"] == []  # the revoked custodian's approval lapsed
    world.refused(world.decide(cid, "kh-officer"))
    assert world.decide(cid, "dpo").json["state"] == "pending"


def test_replayed_approval_from_another_case(world: World) -> None:
    a, b = world.file()["case_id"], world.file()["case_id"]
    headers, key = world.custodians["dpo"]
    signature = key.sign(escrowfmt.case_digest(world.case(a)))
    replay = world.api.call(
        "POST",
        f"/v1/escrow/cases/{b}/approvals",
        headers,
        json={"custodian": "dpo", "signature": base64.b64encode(signature).decode()},
    )
    world.refused(replay)
    assert "signature" in world.api.audit()[-1]["detail"]


def test_expired_approval_does_not_count(world: World) -> None:
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    world.clock.advance(86401)  # the approval TTL
    assert world.decide(cid, "dpo").json["state"] == "pending"
    assert world.case(cid)["approvals"] == ["dpo"]


def test_requester_cannot_approve_and_services_cannot_use_cases(world: World) -> None:
    cid = world.file()["case_id"]
    digest = escrowfmt.case_digest(world.case(cid))
    sig = base64.b64encode(Ed25519PrivateKey.generate().sign(digest)).decode()
    r = world.api.call(
        "POST",
        f"/v1/escrow/cases/{cid}/approvals",
        world.police,
        json={"custodian": "police", "signature": sig},
    )
    world.refused(r)
    headers, _ = world.custodians["dpo"]
    impersonate = world.api.call(
        "POST",
        f"/v1/escrow/cases/{cid}/approvals",
        headers,
        json={"custodian": "kh-officer", "signature": sig},
    )
    world.refused(impersonate)  # a custodian submits only their own decision
    body = {
        "ciphertext": world.blobs[0]["ciphertext"],
        "context": {"patient": "p0"},
        "justification": "legal_request",
        "case_id": cid,
    }
    world.refused(world.api.call("POST", "/v1/decrypt", world.svc, json=body))
    without_case = {k: v for k, v in body.items() if k != "case_id"}
    world.refused(world.api.call("POST", "/v1/decrypt", world.svc, json=without_case))
    world.refused(world.api.call("POST", "/v1/decrypt", world.police, json=without_case))
    world.refused(world.api.call("POST", "/v1/escrow/cases", world.svc, json=VALID_CASE))


def _active(world: World, **changes: Any) -> str:
    cid = world.file(**changes)["case_id"]
    world.decide(cid, "kh-officer")
    world.decide(cid, "dpo")
    world.deliver()
    world.clock.advance(3601)
    return cid


def test_unwraps_outside_the_scope(world: World) -> None:
    cid = _active(world)
    world.refused(world.unwrap(cid, 1))  # patient p1 is outside the context filter
    other = world.api.call(
        "POST", "/v1/keys/other/datakey", world.svc, json={"context": {"patient": "p0"}}
    ).json
    world.refused(world.unwrap(cid, ciphertext=other["ciphertext"]))  # key outside the scope
    world.refused(world.unwrap(cid, justification="break_glass"))  # not the case's code
    assert world.unwrap(cid).status_code == 200


def test_unwraps_limited_to_named_blobs(world: World) -> None:
    cid = _active(world, scope={"keys": ["records"], "blobs": [world.blobs[2]["ciphertext"]]})
    world.refused(world.unwrap(cid, 0))
    assert unb64(world.unwrap(cid, 2).json["plaintext"]) == unb64(world.blobs[2]["plaintext"])


def test_expiry_and_revocation(world: World) -> None:
    cid = _active(world, expires_in_seconds=7200)
    assert world.unwrap(cid).status_code == 200
    world.clock.advance(3600)
    world.refused(world.unwrap(cid))
    assert world.case(cid)["state"] == "expired"
    cid2 = _active(world)
    assert (
        world.api.call("POST", f"/v1/escrow/cases/{cid2}/revoke", world.api.admin, json={}).json[
            "state"
        ]
        == "revoked"
    )
    world.refused(world.unwrap(cid2))
    world.refused(world.decide(cid2, "legal"), 409)


def test_data_owner_veto_during_the_waiting_period(world: World) -> None:
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    assert world.decide(cid, "dpo").json["state"] == "approved"
    world.deliver()
    vetoed = world.decide(cid, "dpo", decision="reject")
    assert vetoed.status_code == 201 and vetoed.json["state"] == "rejected"
    world.clock.advance(3601)
    world.refused(world.unwrap(cid))
    assert world.case(cid)["state"] == "rejected"


def test_rejection_from_a_non_veto_group_does_not_block(world: World) -> None:
    cid = world.file()["case_id"]
    assert world.decide(cid, "legal", decision="reject").json["state"] == "pending"
    world.decide(cid, "kh-officer")
    assert world.decide(cid, "dpo").json["state"] == "approved"


def test_per_key_policy_raises_the_quorum(world: World) -> None:
    r = world.api.call(
        "POST", "/v1/keys/records/escrow-policy", world.api.admin, json={"quorum": 3}
    )
    assert r.status_code == 200 and r.json["escrow_policy"]["quorum"] == 3
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    assert world.decide(cid, "dpo").json["state"] == "pending"
    assert world.decide(cid, "legal").json["state"] == "approved"
    for bad in ({"quorum": 0}, {"quorum": 1, "required_groups": ["a", "b"]}, {"quorum": "2"}):
        assert (
            world.api.call(
                "POST", "/v1/keys/records/escrow-policy", world.api.admin, json=bad
            ).status_code
            == 400
        )


def test_grant_justifications(world: World) -> None:
    api, svc = world.api, world.svc
    ct = world.blobs[0]["ciphertext"]
    ctx = {"patient": "p0"}
    for code in ("customer_initiated", "backup_restore"):
        world.refused(
            api.call(
                "POST",
                "/v1/decrypt",
                svc,
                json={"ciphertext": ct, "context": ctx, "justification": code},
            )
        )
    r = api.call(
        "POST",
        "/v1/keys/records/grants",
        api.admin,
        json={
            "principal": "svc",
            "operations": ["decrypt"],
            "justifications": ["service_processing", "backup_restore"],
        },
    )
    assert r.json["justifications"] == ["backup_restore", "service_processing"]
    ok = api.call(
        "POST",
        "/v1/decrypt",
        svc,
        json={
            "ciphertext": ct,
            "context": ctx,
            "justification": "backup_restore",
            "reference": "restore #12",
        },
    )
    assert ok.status_code == 200
    assert api.audit()[-1]["detail"] == "reference=restore #12"
    for forbidden in (["legal_request"], ["break_glass"], ["made_up"], []):
        r = api.call(
            "POST",
            "/v1/keys/records/grants",
            api.admin,
            json={"principal": "svc", "operations": ["decrypt"], "justifications": forbidden},
        )
        assert r.status_code == 400, forbidden


VALID_CASE: dict[str, Any] = {
    "legal_basis": "x",
    "reference": "r",
    "justification": "legal_request",
    "scope": {"keys": ["records"]},
    "max_unwraps": 1,
    "expires_in_seconds": 600,
}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {**VALID_CASE, "justification": "service_processing"},
        {**VALID_CASE, "scope": {"keys": []}},
        {**VALID_CASE, "scope": {"keys": ["nope"]}},
        {**VALID_CASE, "max_unwraps": 0},
        {**VALID_CASE, "expires_in_seconds": 10},
        {**VALID_CASE, "legal_basis": ""},
        {**VALID_CASE, "scope": {"keys": ["records"], "blobs": ["!!"]}},
        {**VALID_CASE, "scope": "records"},
    ],
)
def test_bad_cases_are_refused_clearly(world: World, body: dict[str, Any]) -> None:
    r = world.api.call("POST", "/v1/escrow/cases", world.police, json=body)
    assert r.status_code in (400, 404) and r.json["error"]["code"] in (
        "invalid_request",
        "not_found",
    )


def test_bad_custodian_registrations(world: World) -> None:
    api = world.api
    raw = base64.b64encode(b"\x01" * 31).decode()
    for body in (
        {"name": "dpo", "group": "x", "public_key": raw},
        {"name": "svc", "group": "x", "public_key": base64.b64encode(b"\x02" * 32).decode()},
        {"name": "dpo", "group": "bad group!", "public_key": raw},
    ):
        assert api.call("POST", "/v1/custodians", api.admin, json=body).status_code == 400
    key = _raw_public_key()
    dup = api.call(
        "POST",
        "/v1/custodians",
        api.admin,
        json={"name": "dpo", "group": "data_owner", "public_key": base64.b64encode(key).decode()},
    )
    assert dup.status_code == 409
    assert (
        api.call(
            "POST",
            "/v1/escrow/cases/nope/approvals",
            world.custodians["dpo"][0],
            json={"custodian": "dpo", "signature": "AAAA"},
        ).status_code
        == 400
    )


def test_no_escrow_without_a_way_to_tell_the_data_owner(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage
) -> None:
    app = create_app(settings, hsm=hsm, storage=storage)  # no webhook configured
    token = app.extensions["kms"].principals.bootstrap_admin("admin")
    api = Api(app.test_client(), token)
    api.key("records")
    police = api.principal("requester", "police")
    r = api.call(
        "POST",
        "/v1/escrow/cases",
        police,
        json=VALID_CASE,
    )
    assert r.status_code == 503 and r.json["error"]["code"] == "escrow_unavailable"


def test_an_undelivered_approval_never_activates(world: World) -> None:
    world.receiver.fail_first = 10**6  # the data owner's endpoint is down
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    world.decide(cid, "dpo")
    for _ in range(5):
        world.deliver()
        world.clock.advance(600)
    view = world.case(cid)
    assert view["state"] == "approved" and view["active_from"] is None
    assert {n["state"] for n in view["notifications"]} == {"pending"}
    world.refused(world.unwrap(cid))


def test_revoking_a_custodian_after_the_quorum_stops_the_case(world: World) -> None:
    cid = _active(world)
    assert world.unwrap(cid).status_code == 200
    world.enrol("kh-officer-2", "keyholder", endorser="kh-officer")
    r = world.api.call("DELETE", "/v1/custodians/kh-officer", world.api.admin)
    assert r.status_code == 200, r.json
    world.refused(world.unwrap(cid))
    assert "quorum no longer holds" in world.api.audit()[-1]["detail"]


def test_a_database_edit_cannot_activate_widen_or_refill_a_case(world: World, db_path: Any) -> None:
    import sqlite3

    def db(sql: str, *args: Any) -> None:
        with sqlite3.connect(db_path) as conn:
            conn.execute(sql, args)

    pending = world.file()["case_id"]
    db(
        "UPDATE escrow_cases SET state = 'active', active_from = '2000-01-01T00:00:00.000Z'"
        " WHERE case_id = ?",
        pending,
    )
    world.refused(world.unwrap(pending))  # the row fails its HSM seal
    assert "seal" in world.api.audit()[-1]["detail"]
    active = _active(world)
    assert world.unwrap(active).status_code == 200
    assert world.unwrap(active).status_code == 200  # budget of 2 used up
    db("UPDATE escrow_cases SET unwraps_used = 0 WHERE case_id = ?", active)
    world.refused(world.unwrap(active))  # refilling the budget breaks the seal
    widened = _active(world)
    db(
        'UPDATE escrow_cases SET scope = replace(scope, \'"patient": "p0"\', '
        '\'"patient": "p1"\') WHERE case_id = ?',
        widened,
    )
    world.refused(world.unwrap(widened, 1))


def test_a_swapped_custodian_key_cannot_approve(world: World, db_path: Any) -> None:
    """The database alone cannot forge an approval: custodian rows are sealed by the HSM."""
    import sqlite3

    forger = Ed25519PrivateKey.generate()
    raw = forger.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE custodians SET public_key = ? WHERE name = 'dpo'", (raw,))
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    world.refused(world.decide(cid, "dpo", key=forger))
    assert world.case(cid)["state"] == "pending"


def test_enrolment_needs_an_endorsement_from_the_group(world: World) -> None:
    api = world.api
    api.principal("custodian", "dpo-2")
    new_key = Ed25519PrivateKey.generate()
    raw = new_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    body = {"name": "dpo-2", "group": "data_owner", "public_key": base64.b64encode(raw).decode()}
    assert (
        api.call("POST", "/v1/custodians", api.admin, json=body).status_code == 403
    )  # admin alone
    _, kh_key = world.custodians["kh-officer"]
    wrong = kh_key.sign(escrowfmt.enrolment_message("dpo-2", "data_owner", raw))  # not a member
    r = api.call(
        "POST",
        "/v1/custodians",
        api.admin,
        json={
            **body,
            "endorsement": {
                "custodian": "kh-officer",
                "signature": base64.b64encode(wrong).decode(),
            },
        },
    )
    assert r.status_code == 403
    _, dpo_key = world.custodians["dpo"]
    good = dpo_key.sign(escrowfmt.enrolment_message("dpo-2", "data_owner", raw))
    r = api.call(
        "POST",
        "/v1/custodians",
        api.admin,
        json={
            **body,
            "endorsement": {"custodian": "dpo", "signature": base64.b64encode(good).decode()},
        },
    )
    assert r.status_code == 201, r.json
    api.principal("custodian", "copycat")
    same_key = {"name": "copycat", "group": "legal", "public_key": body["public_key"]}
    assert api.call("POST", "/v1/custodians", api.admin, json=same_key).status_code == 409
    world.deliver()
    events = [a["event"] for a in world.receiver.accepted]
    assert events.count("custodian_registered") == 4  # three at set-up, dpo-2 now


def test_endorsement_can_be_switched_off(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> None:
    loose = dataclasses.replace(
        settings,
        escrow_endorsed_enrolment=False,
        escrow_required_groups=frozenset({"keyholder"}),
        escrow_webhook_url=receiver.url,
        escrow_webhook_secret=SECRET,
    )
    app = create_app(loose, hsm=hsm, storage=storage)
    api = Api(app.test_client(), app.extensions["kms"].principals.bootstrap_admin("admin"))
    api.principal("custodian", "c1")
    app.extensions["kms"].custodians.pin_custodian("c1", "keyholder", _raw_public_key())
    api.principal("custodian", "c2")
    raw = base64.b64encode(_raw_public_key()).decode()
    body = {"name": "c2", "group": "keyholder", "public_key": raw}
    r = api.call("POST", "/v1/custodians", api.admin, json=body)
    assert r.status_code == 201, r.json  # no endorsement asked


def test_escrow_needs_required_groups_and_known_groups(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> None:
    no_groups = dataclasses.replace(
        settings, escrow_webhook_url=receiver.url, escrow_webhook_secret=SECRET
    )
    app = create_app(no_groups, hsm=hsm, storage=storage)
    api = Api(app.test_client(), app.extensions["kms"].principals.bootstrap_admin("admin"))
    api.principal("custodian", "c1")
    raw = _raw_public_key()
    r = api.call(
        "POST",
        "/v1/custodians",
        api.admin,
        json={"name": "c1", "group": "anything", "public_key": base64.b64encode(raw).decode()},
    )
    assert r.status_code == 503 and r.json["error"]["code"] == "escrow_unavailable"


def test_control_characters_are_refused(world: World) -> None:
    r = world.api.call(
        "POST",
        "/v1/escrow/cases",
        world.police,
        json={
            "legal_basis": "order\x1b[8m hidden",
            "reference": "r",
            "justification": "legal_request",
            "scope": {"keys": ["records"]},
            "max_unwraps": 1,
            "expires_in_seconds": 600,
        },
    )
    assert r.status_code == 400 and "control characters" in r.json["error"]["message"]


def test_narrowed_justification_refuses_at_commit(world: World) -> None:
    api = world.api
    api.call(
        "POST",
        "/v1/keys/records/grants",
        api.admin,
        json={
            "principal": "svc",
            "operations": ["decrypt"],
            "justifications": ["service_processing", "backup_restore"],
        },
    )
    services = world.services
    real_decrypt = services.crypto._hsm.decrypt

    def decrypt_then_narrow(*args: Any, **kwargs: Any) -> bytes:
        out = real_decrypt(*args, **kwargs)
        r = api.call(
            "POST",
            "/v1/keys/records/grants",
            api.admin,
            json={"principal": "svc", "operations": ["decrypt"]},
        )
        assert r.status_code == 200  # the read phase holds no write lock
        return bytes(out)

    services.crypto._hsm = type("H", (), {"decrypt": staticmethod(decrypt_then_narrow)})()
    r = api.call(
        "POST",
        "/v1/decrypt",
        world.svc,
        json={
            "ciphertext": world.blobs[0]["ciphertext"],
            "context": {"patient": "p0"},
            "justification": "backup_restore",
        },
    )
    world.refused(r)


def test_a_version_retired_during_an_escrow_unwrap_is_caught_at_commit(world: World) -> None:
    """The commit-time re-check covers unwraps under a case, not only grants."""
    assert world.api.call("POST", "/v1/keys/records/rotate", world.api.admin).status_code == 200
    cid = _active(world)
    crypto = world.services.crypto
    real_open = crypto._open

    def open_then_retire(*args: Any) -> bytes:
        plaintext: bytes = real_open(*args)
        r = world.api.call(
            "POST", "/v1/keys/records/config", world.api.admin, json={"min_decryption_version": 2}
        )
        assert r.status_code == 200, r.json
        return plaintext

    crypto._open = open_then_retire  # type: ignore[method-assign]
    try:
        r = world.unwrap(cid)
    finally:
        crypto._open = real_open  # type: ignore[method-assign]
    assert r.status_code == 409 and r.json["error"]["code"] == "key_version_retired"
    assert "plaintext" not in r.json


def _rows(storage: SqlStorage, table: Any, **where: Any) -> dict[str, Any]:
    with storage._engine.begin() as c:
        clause = [table.c[k] == v for k, v in where.items()]
        return dict(c.execute(sa.select(table).where(*clause)).mappings().one())


def _put_back(storage: SqlStorage, table: Any, row: dict[str, Any], key: str) -> None:
    """Write ``row``, an earlier sealed copy, over the current one (the database writer)."""
    with storage._engine.begin() as c:
        c.execute(sa.update(table).where(table.c[key] == row[key]).values(row))


def test_an_older_sealed_copy_of_a_case_cannot_refill_its_budget(
    world: World, storage: SqlStorage
) -> None:
    """Issue 15, attack 4: the case row as it was before its unwraps, written back with
    its own valid seal, is refused at the next unwrap (on PostgreSQL too:
    tests/storage/test_pg_escrow.py runs this module again)."""
    active = _active(world)
    fresh = _rows(storage, t.escrow_cases, case_id=active)
    assert world.unwrap(active).status_code == 200
    assert world.unwrap(active).status_code == 200
    world.refused(world.unwrap(active))  # the budget of 2 is used up
    _put_back(storage, t.escrow_cases, fresh, "case_id")
    world.refused(world.unwrap(active))
    assert "older sealed copy" in world.api.audit()[-1]["detail"]


def test_an_older_sealed_copy_of_a_revoked_custodian_does_not_count(
    world: World, storage: SqlStorage
) -> None:
    """A revoked custodian's row written back active: its approval is not counted."""
    before = _rows(storage, t.custodians, name="dpo")
    world.enrol("dpo-2", "data_owner", endorser="dpo")
    assert world.api.call("DELETE", "/v1/custodians/dpo", world.api.admin).status_code == 200
    _put_back(storage, t.custodians, before, "name")
    cid = world.file()["case_id"]
    world.decide(cid, "kh-officer")
    world.refused(world.decide(cid, "dpo"))
    assert world.case(cid)["state"] == "pending"


def test_the_last_member_of_a_required_or_veto_group_cannot_be_revoked(world: World) -> None:
    """Issue 16's attack: the admin revoked the data owner's only custodian, registered
    one of its own in the emptied group without endorsement, and opened data with the
    keyholder's officer. The revocation is now refused; the group keeps its veto."""
    api = world.api
    for name, group in (("dpo", "data_owner"), ("kh-officer", "keyholder")):
        r = api.call("DELETE", f"/v1/custodians/{name}", api.admin)
        assert r.status_code == 409 and "last active custodian" in r.json["error"]["message"]
        assert f"group {group!r}" in r.json["error"]["message"]
        assert api.audit()[-1]["outcome"] == "conflict"
    api.principal("custodian", "mallory")
    raw = base64.b64encode(_raw_public_key()).decode()
    body = {"name": "mallory", "group": "data_owner", "public_key": raw}
    assert api.call("POST", "/v1/custodians", api.admin, json=body).status_code == 403
    # a group only a key's own policy requires is protected too; one nobody needs is not
    r = api.call(
        "POST",
        "/v1/keys/records/escrow-policy",
        api.admin,
        json={"quorum": 2, "required_groups": ["legal"], "veto_groups": []},
    )
    assert r.status_code == 200, r.json
    assert api.call("DELETE", "/v1/custodians/legal", api.admin).status_code == 409
    world.enrol("legal-2", "legal", endorser="legal")
    assert api.call("DELETE", "/v1/custodians/legal", api.admin).status_code == 200
    # with a second member, the first can go (the data owner is told of each change)
    world.enrol("dpo-2", "data_owner", endorser="dpo")
    assert api.call("DELETE", "/v1/custodians/dpo", api.admin).status_code == 200
    assert api.call("DELETE", "/v1/custodians/dpo-2", api.admin).status_code == 409


def test_a_group_s_first_member_comes_only_from_deployment(world: World, tmp_path: Any) -> None:
    """The API never adds the first member of a group (an admin would otherwise staff an
    empty group with its own custodian); ``kms init --custodian`` pins it, on the server
    host, and the audit trail records it. Pinning is idempotent and never a second
    member."""
    api = world.api
    api.principal("custodian", "l1")
    raw = _raw_public_key()
    body = {"name": "l1", "group": "audit_board", "public_key": base64.b64encode(raw).decode()}
    r = api.call("POST", "/v1/custodians", api.admin, json=body)
    assert r.status_code == 400  # not a configured group
    r = api.call("POST", "/v1/custodians", api.admin, json={**body, "group": "legal"})
    assert r.status_code == 403 and "must endorse" in r.json["error"]["message"]
    pins = world.services.custodians
    # revoke legal's only member (no policy needs the group), then try to restaff it
    assert api.call("DELETE", "/v1/custodians/legal", api.admin).status_code == 200
    r = api.call("POST", "/v1/custodians", api.admin, json={**body, "group": "legal"})
    assert r.status_code == 403 and "pinned at deployment" in r.json["error"]["message"]
    assert pins.pin_custodian("l1", "legal", raw) is None  # the principal existed
    assert pins.pin_custodian("l1", "legal", raw) is None  # idempotent
    (pinned,) = [x for x in api.audit() if x["operation"] == "pin_custodian"][-1:]
    assert "custodian=l1 group=legal" in pinned["detail"] and pinned["principal"] is None
    with pytest.raises(Conflict):  # never a second member by pinning
        pins.pin_custodian("l2", "legal", _raw_public_key())
    with pytest.raises(Conflict):  # nor someone else's key
        pins.pin_custodian("l3", "audit_board", raw)


def test_a_custodian_deleted_in_the_database_does_not_empty_its_group(
    world: World, storage: SqlStorage
) -> None:
    """Deleting the data owner's only custodian row would let an admin enrol its own
    custodian in that group without endorsement: the deletion is refused instead."""
    with storage._engine.begin() as c:
        c.execute(sa.delete(t.custodians).where(t.custodians.c.name == "dpo"))
    world.api.principal("custodian", "mallory")
    raw = base64.b64encode(_raw_public_key()).decode()
    body = {"name": "mallory", "group": "data_owner", "public_key": raw}
    r = world.api.call("POST", "/v1/custodians", world.api.admin, json=body)
    assert r.status_code == 403, r.json
    assert "custodian rows dpo were deleted" in world.api.audit()[-1]["detail"]


def test_revoking_a_custodian_never_reseals_a_row_edited_in_the_database(
    world: World, storage: SqlStorage
) -> None:
    """Revocation re-seals the custodian's row: it must not seal a public key the
    database writer swapped in (a revoked custodian's rejections still count)."""
    forged = _raw_public_key()
    with storage._engine.begin() as c:
        c.execute(
            sa.update(t.custodians).where(t.custodians.c.name == "dpo").values(public_key=forged)
        )
    r = world.api.call("DELETE", "/v1/custodians/dpo", world.api.admin)
    assert r.status_code == 403, r.json
    row = _rows(storage, t.custodians, name="dpo")
    assert row["state"] == "active" and row["public_key"] == forged  # left as it was: broken

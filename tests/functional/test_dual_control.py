"""Dual control of the control plane (kms/services/changes.py): a gated change proposed by
an admin takes effect only once custodians other than the proposer approved it, in the
groups it needs, and only as its proposer applies it, once."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms import config
from kms.backends.hsm import Pkcs11Hsm
from kms.backends.storage import SqlStorage
from tests.dual_control_support import Board, make_board
from tests.helpers import Receiver


@pytest.fixture
def board(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> Iterator[Board]:
    yield from make_board(settings, hsm, storage, receiver)


def _names(board: Board) -> set[str]:
    r = board.api.call("GET", "/v1/principals", board.api.admin)
    return {p["name"] for p in r.json["principals"]}


def _decrypt(board: Board, who: dict[str, str], blob: dict[str, Any]) -> Any:
    body = {"ciphertext": blob["ciphertext"], "context": {"patient": "p1"}}
    return board.api.call("POST", "/v1/decrypt", who, json=body)


def test_an_admin_alone_creates_no_service_and_grants_no_decrypt(board: Board) -> None:
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    assert change["kind"] == "create_principal" and change["proposer"] == "admin"
    assert change["params"] == {"name": "svc", "role": "service", "ttl_seconds": None}
    assert "token" not in str(change) and "svc" not in _names(board)
    assert change["required_groups"] == ["data_owner", "keyholder"]
    assert change["approved"] is False
    # what needs no approval still works: a key, and a grant that returns no plaintext
    key = board.api.call("POST", "/v1/keys", board.api.admin, json={"alias": "records"})
    assert key.status_code == 201
    board.api.principal("auditor", "aud")  # an auditor needs no approval
    refused = board.api.call(
        "POST",
        "/v1/keys/records/grants",
        board.api.admin,
        json={"principal": "aud", "operations": ["decrypt"]},
    )
    assert refused.status_code == 400  # what could never apply is not proposed
    assert "role service" in refused.json["error"]["message"]
    assert (
        board.api.call("GET", "/v1/changes", board.api.admin).json["changes"][0]["kind"]
        == "create_principal"
    )
    board.service("app")
    grant = {"principal": "app", "operations": ["decrypt"]}
    proposed = board.propose("POST", "/v1/keys/records/grants", grant)
    assert proposed["params"]["key"] == key.json["key_id"]  # the key id, never the alias


def test_proposed_approved_applied_once(board: Board) -> None:
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    cid = change["change_id"]
    assert board.apply(cid).status_code == 403  # no approvals
    assert board.sign(change, "officer").json["change"]["approvals"] == ["officer"]
    assert board.apply(cid).status_code == 403  # one is not the quorum
    approved = board.sign(change, "dpo").json["change"]
    assert approved["approved"] is True and approved["state"] == "pending"
    applied = board.apply(cid)
    assert applied.status_code == 201 and applied.json["name"] == "svc"
    svc = {"Authorization": f"Bearer {applied.json['token']}"}
    board.api.call("POST", "/v1/keys", board.api.admin, json={"alias": "records"})
    r = board.api.call("POST", "/v1/keys/records/encrypt", svc, json={"plaintext": "aGk="})
    assert r.status_code == 403  # a service, with no grant yet
    assert board.apply(cid).status_code == 409  # applied once
    assert board.change(cid)["state"] == "applied"
    ops = [r["operation"] for r in board.api.audit()]
    for op in ("propose_change", "approve_change", "apply_change", "create_principal"):
        assert op in ops


def test_the_whole_route_to_plaintext_needs_the_data_owner(board: Board) -> None:
    svc = board.service("svc")
    board.api.call("POST", "/v1/keys", board.api.admin, json={"alias": "records"})
    change = board.propose(
        "POST", "/v1/keys/records/grants", {"principal": "svc", "operations": ["datakey"]}
    )
    board.approve(change, ("officer", "counsel"))  # two approvals, but not the data owner
    view = board.change(change["change_id"])
    assert view["approvals"] == ["counsel", "officer"] and view["approved"] is False
    refused = board.apply(change["change_id"])
    assert refused.status_code == 403 and "data_owner" in refused.json["error"]["message"]
    r = board.api.call("POST", "/v1/keys/records/datakey", svc, json={"context": {"patient": "p1"}})
    assert r.status_code == 403
    board.approve(change, ("dpo",))
    assert board.apply(change["change_id"]).status_code == 200
    r = board.api.call("POST", "/v1/keys/records/datakey", svc, json={"context": {"patient": "p1"}})
    assert r.status_code == 200


def test_a_rejection_by_a_needed_group_rejects(board: Board) -> None:
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    board.approve(change, ("officer",))
    rejected = board.sign(change, "dpo", "reject").json["change"]
    assert rejected["state"] == "rejected" and rejected["rejections"] == ["dpo"]
    assert board.apply(change["change_id"]).status_code == 409
    assert board.sign(change, "counsel").status_code == 409
    assert "svc" not in _names(board)


def test_a_rejection_by_another_group_is_recorded_but_does_not_reject(board: Board) -> None:
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    assert board.sign(change, "counsel", "reject").json["change"]["state"] == "pending"
    board.approve(change)
    assert board.apply(change["change_id"]).status_code == 201


def test_a_change_expires(board: Board) -> None:
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    board.approve(change, ("officer",))
    board.clock.advance(7 * 86400 + 1)
    assert board.change(change["change_id"])["state"] == "expired"
    assert board.sign(change, "dpo").status_code == 409
    assert board.apply(change["change_id"]).status_code == 409


def test_only_the_proposer_applies(board: Board) -> None:
    other = board.service("x")  # a service cannot apply, and neither can another admin
    admin2 = board.through("POST", "/v1/principals", {"name": "admin2", "role": "admin"})
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    board.approve(change)
    for headers in (other, {"Authorization": f"Bearer {admin2.json['token']}"}):
        assert board.apply(change["change_id"], headers).status_code == 403
    assert board.apply(change["change_id"]).status_code == 201


def test_bad_decisions_are_refused_and_change_nothing(board: Board) -> None:
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    other = board.propose("POST", "/v1/principals", {"name": "svc2", "role": "service"})
    cid = change["change_id"]
    url = f"/v1/changes/{cid}/approve"
    headers = board.custodians["dpo"][0]
    # a signature of another change, by another key, of the wrong decision, malformed
    assert board.sign({**other}, "dpo").status_code == 200  # dpo approves the other one
    replayed = board.api.call(
        "POST",
        url,
        headers,
        json={"custodian": "dpo", "signature": _signature(board, other, "dpo")},
    )
    assert replayed.status_code == 403
    assert board.sign(change, "dpo", key=Ed25519PrivateKey.generate()).status_code == 403
    for body in (
        {"custodian": "dpo", "signature": "not base64!"},
        {"custodian": "dpo", "signature": base64.b64encode(b"x" * 10).decode()},
        {"custodian": "dpo"},
        {"custodian": 7, "signature": _signature(board, change, "dpo")},
        [],
    ):
        assert board.api.call("POST", url, headers, json=body).status_code == 400
    # another custodian's decision, by the admin, by a service
    as_officer = {"custodian": "officer", "signature": _signature(board, change, "officer")}
    assert board.api.call("POST", url, headers, json=as_officer).status_code == 403
    assert board.api.call("POST", url, board.api.admin, json=as_officer).status_code == 403
    assert board.api.call("POST", "/v1/changes/nope/approve", headers, json={}).status_code == 400
    assert board.change(cid)["approvals"] == []
    # a decision twice
    assert board.sign(change, "dpo").status_code == 200
    assert board.sign(change, "dpo").status_code == 409


def _signature(board: Board, change: dict[str, Any], who: str) -> str:
    from kms.formats import change as changefmt
    from kms.formats import escrow as escrowfmt

    digest = changefmt.change_digest(change)
    return base64.b64encode(
        board.custodians[who][1].sign(escrowfmt.signed_message(digest, "approve"))
    ).decode()


def test_a_change_whose_target_moved_on_is_refused(board: Board) -> None:
    board.service("svc")
    board.api.call("POST", "/v1/keys", board.api.admin, json={"alias": "records"})
    grant = board.propose(
        "POST", "/v1/keys/records/grants", {"principal": "svc", "operations": ["decrypt"]}
    )
    sigv4 = board.propose("POST", "/v1/principals/svc/sigv4-credentials", {})
    board.approve(grant)
    board.approve(sigv4)
    disabled = board.api.call("POST", "/v1/principals/svc/disable", board.api.admin, json={})
    assert disabled.status_code == 200
    for change in (grant, sigv4):
        r = board.apply(change["change_id"])
        assert r.status_code == 409 and "disabled" in r.json["error"]["message"]
        assert board.change(change["change_id"])["state"] == "pending"


def test_a_grant_that_returns_no_plaintext_and_a_revocation_need_no_approval(board: Board) -> None:
    board.service("svc")
    board.api.call("POST", "/v1/keys", board.api.admin, json={"alias": "records"})
    for ops in (["encrypt", "rewrap"], []):
        body = {"principal": "svc", "operations": ops}
        r = board.api.call("POST", "/v1/keys/records/grants", board.api.admin, json=body)
        assert r.status_code == 200, r.json


def test_a_custodian_group_changes_only_with_its_own_members(board: Board) -> None:
    from cryptography.hazmat.primitives import serialization

    from kms.formats import escrow as escrowfmt

    board.api.principal("custodian", "counsel2")
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    endorsement = board.custodians["counsel"][1].sign(
        escrowfmt.enrolment_message("counsel2", "legal", raw)
    )
    body = {
        "name": "counsel2",
        "group": "legal",
        "public_key": base64.b64encode(raw).decode(),
        "endorsement": {
            "custodian": "counsel",
            "signature": base64.b64encode(endorsement).decode(),
        },
    }
    change = board.propose("POST", "/v1/custodians", body)
    assert change["required_groups"] == ["data_owner", "keyholder", "legal"]
    board.approve(change)  # officer and dpo: not the legal group's own member
    assert board.apply(change["change_id"]).status_code == 403
    board.approve(change, ("counsel",))
    assert board.apply(change["change_id"]).status_code == 201
    revoke = board.propose("DELETE", "/v1/custodians/counsel")
    assert "legal" in revoke["required_groups"]


def test_the_data_owner_is_notified(board: Board) -> None:
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    board.services.notifier.deliver_due()
    told = [n["body"] for n in board.receiver.accepted if n["body"]["event"] == "change_proposed"]
    assert told and told[-1]["change"]["change_id"] == change["change_id"]
    assert told[-1]["change"]["digest"] == change["digest"]
    board.approve(change)
    board.apply(change["change_id"])
    board.services.notifier.deliver_due()
    events = [n["body"]["event"] for n in board.receiver.accepted]
    assert "change_applied" in events


def test_the_policy_changes_only_through_a_change(board: Board) -> None:
    ready = board.api.call("GET", "/readyz")
    assert ready.json["control"] == "dual"
    body = {"mode": "single-operator", "quorum": 2, "required_groups": [], "ttl_seconds": 3600}
    change = board.propose("PUT", "/v1/control-policy", body)
    assert change["kind"] == "set_control_policy"
    board.approve(change)
    r = board.apply(change["change_id"])
    assert r.status_code == 200 and r.json["mode"] == "single-operator"
    assert board.api.call("GET", "/readyz").json["control"] == "single-operator"
    created = board.api.call(
        "POST", "/v1/principals", board.api.admin, json={"name": "svc", "role": "service"}
    )
    assert created.status_code == 201  # single-operator mode: at once
    records = [r for r in board.api.audit() if r["operation"] == "set_control_policy"]
    assert records and "mode=single-operator" in records[-1]["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "off", "quorum": 2, "required_groups": [], "ttl_seconds": 3600},
        {"mode": "dual", "quorum": 0, "required_groups": [], "ttl_seconds": 3600},
        {"mode": "dual", "quorum": 2, "required_groups": ["bad group"], "ttl_seconds": 3600},
        {"mode": "dual", "quorum": 2, "required_groups": [], "ttl_seconds": 1},
        {"mode": "dual", "quorum": 2, "required_groups": []},
        {"mode": "dual", "quorum": "2", "required_groups": [], "ttl_seconds": 3600},
    ],
)
def test_a_bad_policy_is_refused_before_it_is_proposed(board: Board, body: Any) -> None:
    r = board.api.call("PUT", "/v1/control-policy", board.api.admin, json=body)
    assert r.status_code == 400, r.json
    assert board.api.call("GET", "/v1/changes", board.api.admin).json["changes"] == []


def test_enabling_a_disabled_principal_again_is_a_change(board: Board) -> None:
    svc = board.service("svc")
    r = board.api.call("POST", "/v1/principals/svc/enable", board.api.admin, json={})
    assert r.status_code == 200  # enabled already: nothing to undo
    assert (
        board.api.call("POST", "/v1/principals/svc/disable", board.api.admin, json={}).status_code
        == 200
    )
    change = board.propose("POST", "/v1/principals/svc/enable", {})
    assert change["kind"] == "enable_principal"
    assert board.api.call("GET", "/v1/keys", svc).status_code == 401  # still disabled
    board.approve(change)
    assert board.apply(change["change_id"]).json["disabled_at"] is None


def test_the_aws_face_refuses_a_gated_change_and_records_it(board: Board) -> None:
    from tests.sigv4_request import signed

    cred = board.through("POST", "/v1/principals/admin/sigv4-credentials", {}).json
    key = board.api.call("POST", "/v1/keys", board.api.admin, json={"alias": "records"}).json
    body = {"KeyId": key["key_id"], "PendingWindowInDays": 7}
    headers, data = signed(
        cred["access_key_id"],
        cred["secret_access_key"],
        target="TrentService.ScheduleKeyDeletion",
        body=body,
        when=board.clock.now(),
    )
    r = board.api.call("POST", "/", headers, data=data)
    answer = json.loads(r.data)
    assert r.status_code == 400 and answer["__type"] == "AccessDeniedException"
    assert "change" in answer["message"]
    assert board.api.call("GET", "/v1/keys/records", board.api.admin).json["state"] == "enabled"
    pending = board.api.call("GET", "/v1/changes?state=pending", board.api.admin).json["changes"]
    assert [c["kind"] for c in pending] == ["schedule_deletion"]


def test_a_proposal_is_one_audit_record_and_a_refused_one_is_the_operation_s(board: Board) -> None:
    before = len(board.api.audit())
    change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
    records = board.api.audit()[before:]
    proposed = [r for r in records if r["operation"] in ("propose_change", "create_principal")]
    assert [(r["operation"], r["outcome"]) for r in proposed] == [("propose_change", "ok")]
    assert change["change_id"] in proposed[0]["detail"]
    body = {"principal": "nobody", "operations": ["decrypt"]}
    board.api.call("POST", "/v1/keys", board.api.admin, json={"alias": "records"})
    r = board.api.call("POST", "/v1/keys/records/grants", board.api.admin, json=body)
    assert r.status_code == 400
    last = board.api.audit()[-1]
    assert (last["operation"], last["outcome"]) == ("grant", "invalid_request")


def test_a_policy_no_change_could_pass_is_refused(board: Board) -> None:
    for body in (
        {"mode": "dual", "quorum": 4, "required_groups": [], "ttl_seconds": 3600},
        {"mode": "dual", "quorum": 2, "required_groups": ["auditors"], "ttl_seconds": 3600},
    ):
        r = board.api.call("PUT", "/v1/control-policy", board.api.admin, json=body)
        assert r.status_code == 400 and "custodian" in r.json["error"]["message"]
    ok = {"mode": "dual", "quorum": 3, "required_groups": ["legal"], "ttl_seconds": 3600}
    assert board.propose("PUT", "/v1/control-policy", ok)["kind"] == "set_control_policy"


def test_with_no_group_needed_any_rejection_rejects(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> None:
    for board in make_board(settings, hsm, storage, receiver, change_required_groups=frozenset()):
        change = board.propose("POST", "/v1/principals", {"name": "svc", "role": "service"})
        assert change["required_groups"] == []
        assert board.sign(change, "counsel", "reject").json["change"]["state"] == "rejected"


def test_changes_are_listed_by_state_as_shown(board: Board) -> None:
    old = board.propose("POST", "/v1/principals", {"name": "a", "role": "service"})
    board.clock.advance(7 * 86400 + 1)
    new = board.propose("POST", "/v1/principals", {"name": "b", "role": "service"})

    def listed(state: str) -> list[str]:
        r = board.api.call("GET", f"/v1/changes?state={state}", board.api.admin)
        return [c["change_id"] for c in r.json["changes"]]

    assert listed("pending") == [new["change_id"]]
    assert listed("expired") == [old["change_id"]]
    assert board.api.call("GET", "/v1/changes?state=nope", board.api.admin).status_code == 400


def test_single_operator_mode_refuses_a_policy_no_change_could_pass_too(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> None:
    for board in make_board(settings, hsm, storage, receiver, control_mode="single-operator"):
        body = {"mode": "dual", "quorum": 16, "required_groups": [], "ttl_seconds": 3600}
        r = board.api.call("PUT", "/v1/control-policy", board.api.admin, json=body)
        assert r.status_code == 400 and "custodians" in r.json["error"]["message"]
        assert board.api.call("GET", "/v1/control-policy", board.api.admin).json["mode"] == (
            "single-operator"
        )
        ok = {"mode": "dual", "quorum": 3, "required_groups": ["legal"], "ttl_seconds": 3600}
        assert board.api.call("PUT", "/v1/control-policy", board.api.admin, json=ok).json == ok


def test_a_rotation_applied_names_the_token_it_replaces(board: Board) -> None:
    board.service("svc")
    tokens = board.api.call("GET", "/v1/principals/svc/tokens", board.api.admin).json["tokens"]
    old = tokens[0]["token_id"]
    r = board.through("POST", f"/v1/principals/svc/tokens/{old}/rotate", {"grace_seconds": 60})
    assert r.status_code == 201 and r.json["replaces"] == old


def test_a_custodian_the_quorum_needs_is_not_cut_off(
    settings: config.Settings, hsm: Pkcs11Hsm, storage: SqlStorage, receiver: Receiver
) -> None:
    """Three custodians, a quorum of 3 (groups none): none of them may go, or no change
    could ever pass again, its repair included."""
    extra = {"change_quorum": 3, "change_required_groups": frozenset()}
    for board in make_board(settings, hsm, storage, receiver, **extra):
        change = board.propose("DELETE", "/v1/custodians/counsel")
        board.approve(change, ("officer", "dpo", "counsel"))
        r = board.apply(change["change_id"])
        assert r.status_code == 409 and "quorum" in r.json["error"]["message"]
        disabled = board.api.call(
            "POST", "/v1/principals/counsel/disable", board.api.admin, json={}
        )
        assert disabled.status_code == 409
        listed = board.api.call("GET", "/v1/changes", board.api.admin).json["changes"]
        assert listed[0]["state"] == "pending"  # refused where it would take effect

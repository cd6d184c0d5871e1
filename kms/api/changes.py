"""Dual control (``/v1/changes``, ``/v1/control-policy``; kms/services/changes.py).

A gated request (creating a service, a decrypt grant, a SigV4 credential ...) made under
dual control answers 202 ``{"change": {...}, "message"}``: the change is pending. The
change's JSON holds every field its digest covers (kms/formats/change.py), so an approver
recomputes the digest before signing; plus ``digest``, ``state`` (pending, applied,
rejected, cancelled or expired), ``required_groups``, ``approvals``, ``rejections`` and
``approved`` (the quorum holds). Once approved, its proposer applies it:
``POST /v1/changes/<id>/apply`` answers what the original request would have (a new
principal's token, a SigV4 secret ...), to the proposer only.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from flask import Blueprint, request

from kms.api import parsing as p
from kms.api import serialize, xks_policy
from kms.api.context import caller, operation, services
from kms.api.parsing import decode_signature
from kms.errors import InvalidRequest
from kms.formats.xks import XksKeyPolicy
from kms.services.audit_events import Caller
from kms.services.change_model import ControlPolicy
from kms.services.changes import payload
from kms.services.key_params import UNSET
from kms.services.model import EscrowPolicy

bp = Blueprint("changes", __name__, url_prefix="/v1")
Json = tuple[dict[str, Any], int] | dict[str, Any]
POLICY_FIELDS = {"mode", "quorum", "required_groups", "ttl_seconds"}


@bp.get("/changes")
@operation("list_changes")
def list_changes() -> Json:
    """``?state=pending|applied|rejected|cancelled`` -> ``{changes: [...]}``, newest first
    (admins, auditors, custodians)."""
    state = request.args.get("state") or None
    found = services().changes.list_changes(caller(), state)
    return {"changes": [payload(v) for v in found]}


@bp.get("/changes/<change_id>")
@operation("read_change")
def show(change_id: str) -> Json:
    return {"change": payload(services().changes.view(caller(), _id(change_id)))}


@bp.post("/changes/<change_id>/approve")
@operation("approve_change")
def approve(change_id: str) -> Json:
    """``{custodian, signature}``: base64 Ed25519 signature of the change digest."""
    return _decide(change_id, "approve")


@bp.post("/changes/<change_id>/reject")
@operation("reject_change")
def reject(change_id: str) -> Json:
    """``{custodian, signature}``: signature of ``b"KMS-ESCROW-REJECT-1\\n" + digest``."""
    return _decide(change_id, "reject")


@bp.post("/changes/<change_id>/cancel")
@operation("cancel_change")
def cancel(change_id: str) -> Json:
    p.json_body(set())
    return {"change": payload(services().changes.cancel(caller(), _id(change_id)))}


@bp.post("/changes/<change_id>/apply")
@operation("apply_change")
def apply(change_id: str) -> Json:
    """The approved change takes effect, as its proposer's request; answers what that
    request answers."""
    p.json_body(set())
    change = services().changes.applicable(caller(), _id(change_id))
    return APPLY[change.kind](replace(caller(), change=change.change_id), change.params)


@bp.get("/control-policy")
@operation("read_control_policy")
def read_policy() -> Json:
    """-> ``{mode, quorum, required_groups, ttl_seconds}`` (public: /readyz shows the mode)."""
    return policy_json(services().changes.policy())


@bp.put("/control-policy")
@operation("set_control_policy")
def set_policy() -> Json:
    """``{mode, quorum, required_groups, ttl_seconds}`` (all of them) -> the new policy; a
    change under dual control."""
    body = p.json_body(POLICY_FIELDS, frozenset(POLICY_FIELDS))
    policy = ControlPolicy(
        p.required_string(body, "mode", max_len=32),
        p.integer(body, "quorum"),
        frozenset(p.string_list(body, "required_groups", max_items=16)),
        p.integer(body, "ttl_seconds"),
    )
    return policy_json(services().changes.set_policy(caller(), policy))


def policy_json(policy: ControlPolicy) -> dict[str, Any]:
    fields = policy.fields()
    del fields["id"]
    return fields


def _decide(change_id: str, decision: str) -> Json:
    body = p.json_body({"custodian", "signature"}, frozenset({"custodian", "signature"}))
    signature = decode_signature(p.required_string(body, "signature", max_len=200))
    view = services().changes.decide(
        caller(),
        _id(change_id),
        p.required_string(body, "custodian", max_len=64),
        signature,
        decision,
    )
    return {"change": payload(view)}


def _id(change_id: str) -> str:
    if len(change_id) != 36 or not all(c in "0123456789abcdef-" for c in change_id):
        raise InvalidRequest("change id must be a UUID")
    return change_id


# -- applying: each kind as its original request (params as the service recorded them) --


def _create_principal(c: Caller, a: dict[str, Any]) -> Json:
    principal, token = services().principals.create(c, a["name"], a["role"], a["ttl_seconds"])
    return {**serialize.principal(principal), "token": token}, 201


def _issue_token(c: Caller, a: dict[str, Any]) -> Json:
    token, found = services().principals.issue_token(
        c, a["name"], a["ttl_seconds"], a["rotate"], a["grace_seconds"]
    )
    replaced = {} if a["rotate"] is None else {"replaces": a["rotate"]}
    return {**serialize.token(found), "token": token, **replaced}, 201


def _grant(c: Caller, a: dict[str, Any]) -> Json:
    granted = services().keys.grant(
        c, a["key"], a["principal"], a["operations"], a["justifications"]
    )
    return {
        "principal": a["principal"],
        "operations": sorted(granted.operations),
        "justifications": sorted(granted.justifications),
    }


def _escrow_policy(c: Caller, a: dict[str, Any]) -> Json:
    policy = EscrowPolicy(a["quorum"], frozenset(a["required_groups"]), frozenset(a["veto_groups"]))
    return serialize.key(services().keys.set_escrow_policy(c, a["key"], policy))


def _schedule_deletion(c: Caller, a: dict[str, Any]) -> Json:
    return serialize.key(services().keys.schedule_deletion(c, a["key"], a["pending_days"]))


def _retire_versions(c: Caller, a: dict[str, Any]) -> Json:
    period = a["rotation_period_days"]
    key = services().keys.configure(
        c, a["key"], UNSET if period == "unchanged" else period, a["min_decryption_version"]
    )
    return serialize.key(key)


def _issue_sigv4(c: Caller, a: dict[str, Any]) -> Json:
    access_key_id, secret = services().sigv4.issue(c, a["name"])
    return {"access_key_id": access_key_id, "secret_access_key": secret}, 201


def _register_custodian(c: Caller, a: dict[str, Any]) -> Json:
    e = a["endorsement"]
    endorsement = None if e is None else (e["custodian"], base64.b64decode(e["signature"]))
    custodian = services().custodians.register_custodian(
        c, a["name"], a["group"], base64.b64decode(a["public_key"]), endorsement
    )
    return {"name": custodian.name, "group": custodian.group, "state": custodian.state}, 201


def _revoke_custodian(c: Caller, a: dict[str, Any]) -> Json:
    services().custodians.revoke_custodian(c, a["name"])
    return {"name": a["name"], "state": "revoked"}


def _xks_policy(c: Caller, a: dict[str, Any]) -> Json:
    def listed(name: str) -> tuple[str, ...] | None:
        return None if a[name] is None else tuple(a[name])

    policy = XksKeyPolicy(frozenset(a["usage"]), listed("aws_principals"), listed("kms_operations"))
    key = services().xks.set_policy(c, a["key"], policy)
    return {**xks_policy.policy_json(key.key_id, policy), "key_id": key.key_id}


def _enable_principal(c: Caller, a: dict[str, Any]) -> Json:
    return serialize.principal(services().principals.set_enabled(c, a["name"], True))


def _control_policy(c: Caller, a: dict[str, Any]) -> Json:
    policy = ControlPolicy(
        a["mode"], a["quorum"], frozenset(a["required_groups"]), a["ttl_seconds"]
    )
    return policy_json(services().changes.set_policy(c, policy))


APPLY: dict[str, Callable[[Caller, dict[str, Any]], Json]] = {
    "create_principal": _create_principal,
    "issue_token": _issue_token,
    "grant": _grant,
    "set_escrow_policy": _escrow_policy,
    "schedule_deletion": _schedule_deletion,
    "retire_versions": _retire_versions,
    "issue_sigv4": _issue_sigv4,
    "register_custodian": _register_custodian,
    "revoke_custodian": _revoke_custodian,
    "set_xks_policy": _xks_policy,
    "enable_principal": _enable_principal,
    "set_control_policy": _control_policy,
}

"""Principals, keys and grants (``/v1/principals``, ``/v1/keys``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from kms.api import parsing as p
from kms.api import serialize
from kms.api.context import caller, operation, services
from kms.errors import InvalidRequest
from kms.services.key_params import UNSET, Unset
from kms.services.model import EscrowPolicy

bp = Blueprint("admin", __name__, url_prefix="/v1")
Json = tuple[dict[str, Any], int] | dict[str, Any]


@bp.post("/principals")
@operation("create_principal")
def create_principal() -> Json:
    """``{name, role}`` -> 201 ``{id, name, role, token}``; the token is shown only here."""
    body = p.json_body({"name", "role"}, frozenset({"name", "role"}))
    principal, token = services().principals.create(
        caller(),
        p.required_string(body, "name", max_len=64),
        p.required_string(body, "role", max_len=16),
    )
    return {**serialize.principal(principal), "token": token}, 201


@bp.get("/principals")
@operation("list_principals")
def list_principals() -> Json:
    return {
        "principals": [
            serialize.principal(x) for x in services().principals.list_principals(caller())
        ]
    }


@bp.post("/keys")
@operation("create_key")
def create_key() -> Json:
    """``{alias?, description?}`` -> 201 key."""
    body = p.json_body({"alias", "description"})
    key = services().keys.create(
        caller(),
        p.string(body, "alias", max_len=64),
        p.string(body, "description", max_len=1024, default="") or "",
    )
    return serialize.key(key), 201


@bp.get("/keys")
@operation("list_keys")
def list_keys() -> Json:
    return {"keys": [serialize.key(k) for k in services().keys.list_keys(caller())]}


@bp.get("/keys/<path:ref>")
@operation("describe_key")
def describe_key(ref: str) -> Json:
    return serialize.key(services().keys.get(caller(), ref))


@bp.post("/keys/<path:ref>/grants")
@operation("grant")
def grant(ref: str) -> Json:
    """``{principal, operations, justifications?}``; replaces the principal's grant on the
    key (empty operations revoke; justifications default to ["service_processing"])."""
    body = p.json_body(
        {"principal", "operations", "justifications"}, frozenset({"principal", "operations"})
    )
    granted = services().keys.grant(
        caller(),
        ref,
        p.required_string(body, "principal", max_len=64),
        p.string_list(body, "operations", max_items=8),
        p.string_list(body, "justifications", max_items=8) if "justifications" in body else None,
    )
    return {
        "principal": body["principal"],
        "operations": sorted(granted.operations),
        "justifications": sorted(granted.justifications),
    }


@bp.post("/keys/<path:ref>/escrow-policy")
@operation("set_escrow_policy")
def escrow_policy(ref: str) -> Json:
    """``{quorum, required_groups?, veto_groups?}``: what escrow cases over this key need."""
    body = p.json_body({"quorum", "required_groups", "veto_groups"}, frozenset({"quorum"}))
    policy = EscrowPolicy(
        p.integer(body, "quorum"),
        frozenset(p.string_list(body, "required_groups", max_items=16))
        if "required_groups" in body
        else frozenset(),
        frozenset(p.string_list(body, "veto_groups", max_items=16))
        if "veto_groups" in body
        else frozenset(),
    )
    return serialize.key(services().keys.set_escrow_policy(caller(), ref, policy))


@bp.post("/keys/<path:ref>/rotate")
@operation("rotate_key")
def rotate(ref: str) -> Json:
    p.json_body(set())
    key = services().keys.rotate(caller(), ref)
    return {**serialize.key(key), "current_version": key.current_version}


@bp.post("/keys/<path:ref>/config")
@operation("configure_key")
def configure(ref: str) -> Json:
    """``{rotation_period_days?: int 1..3650 | null, min_decryption_version?: int}`` ->
    the key. ``null`` turns scheduled rotation off; the minimum decryption version only
    moves forward and never past the current version."""
    body = p.json_body({"rotation_period_days", "min_decryption_version"})
    if not body:
        raise InvalidRequest("give rotation_period_days and/or min_decryption_version")
    period: int | Unset | None = UNSET
    if "rotation_period_days" in body:
        period = (
            None
            if body["rotation_period_days"] is None
            else p.integer(body, "rotation_period_days")
        )
    minimum = (
        p.integer(body, "min_decryption_version") if "min_decryption_version" in body else None
    )
    return serialize.key(services().keys.configure(caller(), ref, period, minimum))


@bp.get("/keys/<path:ref>/usage")
@operation("key_usage")
def usage(ref: str) -> Json:
    """Per-version decrypt counts and last use, and use per day (``?days=1..366``, 30)."""
    days = p.query_int("days", 30)
    return serialize.usage(services().keys.usage(caller(), ref, days))


@bp.post("/keys/<path:ref>/disable")
@operation("disable_key")
def disable(ref: str) -> Json:
    p.json_body(set())
    return serialize.key(services().keys.disable(caller(), ref))


@bp.post("/keys/<path:ref>/enable")
@operation("enable_key")
def enable(ref: str) -> Json:
    p.json_body(set())
    return serialize.key(services().keys.enable(caller(), ref))


@bp.post("/keys/<path:ref>/schedule-deletion")
@operation("schedule_key_deletion")
def schedule_deletion(ref: str) -> Json:
    """``{pending_days: 7..30}`` (default 30)."""
    body = p.json_body({"pending_days"})
    days = 30
    if "pending_days" in body:
        days = p.integer(body, "pending_days")
    return serialize.key(services().keys.schedule_deletion(caller(), ref, days))


@bp.post("/keys/<path:ref>/cancel-deletion")
@operation("cancel_key_deletion")
def cancel_deletion(ref: str) -> Json:
    p.json_body(set())
    return serialize.key(services().keys.cancel_deletion(caller(), ref))

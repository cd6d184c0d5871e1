"""The admin endpoints of the per-key XKS policy (bearer-authenticated, under ``/v1``):
``GET /v1/keys/<ref>/xks`` reads it, ``POST /v1/keys/<ref>/xks`` replaces it. The policy
itself (which usages, AWS principals and KMS operations the XKS face admits) is a value
object of kms/formats/xks.py; kms/services/xks.py keeps and enforces it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from kms.api import parsing as p
from kms.api.context import caller, operation, services
from kms.errors import InvalidRequest
from kms.formats import xks as fmt
from kms.formats.xks import XksKeyPolicy


def blueprint() -> Blueprint:
    """The policy endpoints, registered by kms.api.xks.blueprint."""
    policy = Blueprint("policy", __name__, url_prefix="/v1")
    policy.add_url_rule("/keys/<path:ref>/xks", view_func=read_policy, methods=["GET"])
    policy.add_url_rule("/keys/<path:ref>/xks", view_func=set_policy, methods=["POST"])
    return policy


def policy_json(ref: str, policy: XksKeyPolicy) -> dict[str, Any]:
    return {
        "key": ref,
        "usage": [u for u in fmt.USAGES if u in policy.usage],
        "aws_principals": None if policy.aws_principals is None else list(policy.aws_principals),
        "kms_operations": None if policy.kms_operations is None else list(policy.kms_operations),
    }


@operation("read_xks_policy")
def read_policy(ref: str) -> dict[str, Any]:
    """-> ``{key, usage, aws_principals, kms_operations}`` (admins and auditors)."""
    key, policy = services().xks.policy(caller(), ref)
    return {**policy_json(ref, policy), "key_id": key.key_id}


@operation("set_xks_policy")
def set_policy(ref: str) -> dict[str, Any]:
    """``{usage?, aws_principals?, kms_operations?}`` replaces the key's XKS policy; an absent
    field takes its default (usage ["encrypt", "decrypt"]; lists null: any)."""
    body = p.json_body({"usage", "aws_principals", "kms_operations"})

    def optional_list(name: str) -> tuple[str, ...] | None:
        if body.get(name) is None:
            return None
        return tuple(p.string_list(body, name, max_items=fmt.MAX_POLICY_ENTRIES))

    usage = optional_list("usage")
    try:
        policy = XksKeyPolicy(
            frozenset(fmt.USAGES if usage is None else usage),
            optional_list("aws_principals"),
            optional_list("kms_operations"),
        )
    except fmt.XksFormatError as e:
        raise InvalidRequest(str(e)) from None
    key = services().xks.set_policy(caller(), ref, policy)
    return {**policy_json(ref, policy), "key_id": key.key_id}

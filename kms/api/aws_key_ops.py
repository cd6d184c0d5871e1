"""Key, alias, rotation and lifecycle operations of the AWS KMS face (CreateKey,
DescribeKey, ListKeys, CreateAlias, ListAliases, EnableKeyRotation, DisableKeyRotation,
GetKeyRotationStatus, RotateKeyOnDemand, ListKeyRotations, DisableKey, EnableKey,
ScheduleKeyDeletion, CancelKeyDeletion). Lifecycle and rotation operations take a key id
or key ARN, not an alias, as on AWS.
"""

from __future__ import annotations

import re
from typing import Any

from kms.api import aws_shapes as s
from kms.api import parsing as p
from kms.api.aws_errors import InvalidAliasName, Unsupported, Validation
from kms.api.aws_ops import Face, op
from kms.api.context import caller, services
from kms.errors import NotFound
from kms.services.rotation import next_rotation

ALIAS_NAME_RE = re.compile(r"alias/[A-Za-z0-9][A-Za-z0-9/_-]{0,63}")


@op(
    "CreateKey",
    "create_key",
    "Description KeyUsage KeySpec CustomerMasterKeySpec Origin Policy Tags MultiRegion "
    "BypassPolicyLockoutSafetyCheck CustomKeyStoreId XksKeyId",
)
def create_key(body: p.Body, f: Face) -> dict[str, Any]:
    for field, only in (
        ("KeyUsage", "ENCRYPT_DECRYPT"),
        ("KeySpec", s.ALGORITHM),
        ("CustomerMasterKeySpec", s.ALGORITHM),
        ("Origin", "AWS_KMS"),
    ):
        if p.string(body, field, max_len=64, default=only) != only:
            raise Unsupported(f"this KMS makes only {only} keys ({field})")
    for field in ("Policy", "CustomKeyStoreId", "XksKeyId"):
        if field in body:
            raise Unsupported(f"{field} is not supported: roles and grants decide access here")
    if body.get("Tags") or p.boolean(body, "MultiRegion", False):
        raise Unsupported("tags and multi-Region keys are not supported by this KMS")
    p.boolean(body, "BypassPolicyLockoutSafetyCheck", False)
    description = p.string(body, "Description", max_len=8192, default="") or ""
    key = services().keys.create(caller(), None, description)
    return {"KeyMetadata": s.key_metadata(key, f.arns)}


@op("DescribeKey", "describe_key", "KeyId GrantTokens", "KeyId")
def describe_key(body: p.Body, f: Face) -> dict[str, Any]:
    s.common(body)
    key = f.keys.describe(caller(), s.key_ref(body, "KeyId", f.arns, aliases=True))
    return {"KeyMetadata": s.key_metadata(key, f.arns)}


@op("ListKeys", "list_keys", "Limit Marker")
def list_keys(body: p.Body, f: Face) -> dict[str, Any]:
    keys = services().keys.list_keys(caller())
    return s.page(
        body,
        "Keys",
        keys,
        lambda k: k.key_id,
        lambda k: {"KeyId": k.key_id, "KeyArn": f.arns.key(k.key_id)},
    )


@op("CreateAlias", "create_alias", "AliasName TargetKeyId", "AliasName TargetKeyId")
def create_alias(body: p.Body, f: Face) -> dict[str, Any]:
    name = p.required_string(body, "AliasName", max_len=256)
    if not ALIAS_NAME_RE.fullmatch(name):
        raise InvalidAliasName(
            "AliasName must be alias/ and 1-64 letters, digits, '/', '_' or '-' "
            "(starting with a letter or digit)"
        )
    if name.startswith("alias/aws/"):
        raise InvalidAliasName("alias/aws/ is reserved for AWS managed keys")
    target = s.key_ref(body, "TargetKeyId", f.arns, aliases=False)
    f.keys.create_alias(caller(), name[len(s.ALIAS) :], target)
    return {}


@op("ListAliases", "list_keys", "KeyId Limit Marker")
def list_aliases(body: p.Body, f: Face) -> dict[str, Any]:
    keys = services().keys.list_keys(caller())
    if "KeyId" in body:
        key_id = s.key_ref(body, "KeyId", f.arns, aliases=False)
        keys = [k for k in keys if k.key_id == key_id]
        if not keys:
            raise NotFound(f"Key '{f.arns.key(key_id)}' does not exist")
    named = sorted((k.alias, k.key_id) for k in keys if k.alias is not None)
    return s.page(
        body,
        "Aliases",
        named,
        lambda a: s.ALIAS + a[0],
        lambda a: {
            "AliasName": s.ALIAS + a[0],
            "AliasArn": f.arns.alias(a[0]),
            "TargetKeyId": a[1],
        },
    )


# -- rotation --------------------------------------------------------------------------


@op("EnableKeyRotation", "configure_key", "KeyId RotationPeriodInDays", "KeyId")
def enable_key_rotation(body: p.Body, f: Face) -> dict[str, Any]:
    ref = s.key_ref(body, "KeyId", f.arns, aliases=False)
    days = s.integer(body, "RotationPeriodInDays", 90, 2560, 365)
    services().keys.configure(caller(), ref, rotation_period_days=days)
    return {}


@op("DisableKeyRotation", "configure_key", "KeyId", "KeyId")
def disable_key_rotation(body: p.Body, f: Face) -> dict[str, Any]:
    ref = s.key_ref(body, "KeyId", f.arns, aliases=False)
    services().keys.configure(caller(), ref, rotation_period_days=None)
    return {}


@op("GetKeyRotationStatus", "describe_key", "KeyId", "KeyId")
def get_key_rotation_status(body: p.Body, f: Face) -> dict[str, Any]:
    key = services().keys.get(caller(), s.key_ref(body, "KeyId", f.arns, aliases=False))
    out: dict[str, Any] = {
        "KeyId": f.arns.key(key.key_id),
        "KeyRotationEnabled": key.rotation_period_days is not None,
    }
    if key.rotation_period_days is not None:
        out["RotationPeriodInDays"] = key.rotation_period_days
        due = next_rotation(key)
        if due is not None:
            out["NextRotationDate"] = s.epoch(due)
    return out


@op("RotateKeyOnDemand", "rotate_key", "KeyId", "KeyId")
def rotate_key_on_demand(body: p.Body, f: Face) -> dict[str, Any]:
    key = services().keys.rotate(caller(), s.key_ref(body, "KeyId", f.arns, aliases=False))
    return {"KeyId": key.key_id}


@op("ListKeyRotations", "key_usage", "KeyId IncludeKeyMaterial Limit Marker", "KeyId")
def list_key_rotations(body: p.Body, f: Face) -> dict[str, Any]:
    """Each version after the first is a rotation (ALL_KEY_MATERIAL: every version)."""
    ref = s.key_ref(body, "KeyId", f.arns, aliases=False)
    scope = p.string(body, "IncludeKeyMaterial", max_len=32, default="ROTATIONS_ONLY")
    if scope not in ("ROTATIONS_ONLY", "ALL_KEY_MATERIAL"):
        raise Validation("IncludeKeyMaterial must be ROTATIONS_ONLY or ALL_KEY_MATERIAL")
    usage = services().keys.usage(caller(), ref, days=1)
    first = 1 if scope == "ALL_KEY_MATERIAL" else 2
    arn = f.arns.key(usage.key.key_id)
    return s.page(
        body,
        "Rotations",
        [v for v in usage.versions if v.version >= first],
        lambda v: str(v.version),
        lambda v: {"KeyId": arn, "RotationDate": s.epoch(v.created_at)},
    )


# -- lifecycle -------------------------------------------------------------------------


@op("DisableKey", "disable_key", "KeyId", "KeyId")
def disable_key(body: p.Body, f: Face) -> dict[str, Any]:
    services().keys.disable(caller(), s.key_ref(body, "KeyId", f.arns, aliases=False))
    return {}


@op("EnableKey", "enable_key", "KeyId", "KeyId")
def enable_key(body: p.Body, f: Face) -> dict[str, Any]:
    services().keys.enable(caller(), s.key_ref(body, "KeyId", f.arns, aliases=False))
    return {}


@op("ScheduleKeyDeletion", "schedule_key_deletion", "KeyId PendingWindowInDays", "KeyId")
def schedule_key_deletion(body: p.Body, f: Face) -> dict[str, Any]:
    ref = s.key_ref(body, "KeyId", f.arns, aliases=False)
    days = s.integer(body, "PendingWindowInDays", 7, 30, 30)
    key = services().keys.schedule_deletion(caller(), ref, days)
    assert key.deletion_date is not None
    return {
        "KeyId": f.arns.key(key.key_id),
        "DeletionDate": s.epoch(key.deletion_date),
        "KeyState": s.STATES[key.state],
        "PendingWindowInDays": days,
    }


@op("CancelKeyDeletion", "cancel_key_deletion", "KeyId", "KeyId")
def cancel_key_deletion(body: p.Body, f: Face) -> dict[str, Any]:
    key = services().keys.cancel_deletion(caller(), s.key_ref(body, "KeyId", f.arns, aliases=False))
    return {"KeyId": f.arns.key(key.key_id)}

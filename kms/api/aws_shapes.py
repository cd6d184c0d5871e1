"""Request fields, key references, ARNs and response shapes of the AWS KMS face.

Key references: a key id, a key ARN ``arn:aws:kms:<region>:<account>:key/<key id>``, an
alias name ``alias/<name>`` or an alias ARN ``arn:aws:kms:<region>:<account>:alias/<name>``
(aliases only where AWS accepts them). The AWS alias ``alias/<name>`` is the native alias
``<name>``. ARNs of another region or account name no key here (NotFoundException).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from kms.api import parsing as p
from kms.api.aws_errors import InvalidArn, InvalidKeyUsage, InvalidMarker, Unsupported, Validation
from kms.config import ConfigError, Settings
from kms.errors import NotFound
from kms.formats import context as ctxfmt
from kms.formats import sigv4
from kms.services.key_refs import UUID_RE
from kms.services.model import Key, KeyState

REGION_RE = sigv4.REGION
ACCOUNT_RE = re.compile(r"[0-9]{12}")
ALIAS = "alias/"
ALGORITHM = "SYMMETRIC_DEFAULT"
MAX_KEY_REF = 2048
T = TypeVar("T")

# Native key state -> AWS KeyState. A destroyed key (its material erased after the
# deletion date) can never be used again: "Unavailable".
STATES = {
    KeyState.ENABLED: "Enabled",
    KeyState.DISABLED: "Disabled",
    KeyState.PENDING_DELETION: "PendingDeletion",
    KeyState.DESTROYED: "Unavailable",
}


@dataclass(frozen=True)
class Arns:
    """The region and account of this KMS's ARNs."""

    region: str = "us-east-1"
    account: str = "000000000000"

    @classmethod
    def from_settings(cls, settings: Settings | None) -> Arns:
        """From KMS_AWS_REGION / KMS_AWS_ACCOUNT_ID; ConfigError if malformed."""
        if settings is None:
            return cls()
        if not REGION_RE.fullmatch(settings.aws_region):
            raise ConfigError("KMS_AWS_REGION must look like an AWS region (e.g. eu-west-3)")
        if not ACCOUNT_RE.fullmatch(settings.aws_account_id):
            raise ConfigError("KMS_AWS_ACCOUNT_ID must be 12 digits")
        return cls(settings.aws_region, settings.aws_account_id)

    def key(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def alias(self, native_alias: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:{ALIAS}{native_alias}"

    def ref(self, value: str, *, aliases: bool) -> str:
        """The native reference (key id, or alias name without ``alias/``) for an AWS key
        reference; NotFound for one that cannot name a key of this KMS (or an alias
        where the operation takes only key ids and key ARNs)."""
        resource = value
        if value.startswith("arn:"):
            parts = value.split(":", 5)
            if len(parts) != 6 or parts[1:3] != ["aws", "kms"]:
                raise InvalidArn(f"Invalid arn {value[:200]}")
            if parts[3:5] != [self.region, self.account]:
                raise NotFound(f"Key '{value[:200]}' does not exist")
            resource = parts[5]
            if resource.startswith("key/"):
                resource = resource[4:]
            elif not resource.startswith(ALIAS):
                raise InvalidArn(f"Invalid arn {value[:200]}")
        if UUID_RE.fullmatch(resource):
            return resource
        if not resource.startswith(ALIAS) or len(resource) == len(ALIAS):
            raise NotFound(f"Invalid keyId '{value[:200]}'")
        if not aliases:
            raise NotFound(
                f"Invalid keyId '{value[:200]}': this operation takes a key id or key ARN, "
                "not an alias"
            )
        return resource[len(ALIAS) :]


# -- request fields --------------------------------------------------------------------


def key_ref(body: p.Body, name: str, arns: Arns, *, aliases: bool) -> str:
    return arns.ref(p.required_string(body, name, max_len=MAX_KEY_REF), aliases=aliases)


def optional_key_ref(body: p.Body, name: str, arns: Arns) -> str | None:
    return key_ref(body, name, arns, aliases=True) if name in body else None


def context(body: p.Body, name: str) -> dict[str, str]:
    try:
        return ctxfmt.validate(body.get(name))
    except ctxfmt.ContextError as e:
        raise Validation(f"{name}: {e}") from None


def blob(body: p.Body, name: str, *, max_bytes: int) -> bytes:
    if name not in body:
        raise Validation(f"{name} is required")
    data = p.b64(body, name, max_bytes=max_bytes)
    if not data:
        raise Validation(f"{name} must be at least 1 byte")
    return data


def common(body: p.Body, *algorithms: str) -> None:
    """Check the fields many operations share: GrantTokens (accepted, not needed here:
    grants take effect at once), the encryption algorithm fields (SYMMETRIC_DEFAULT only),
    DryRun (not supported when true)."""
    if "GrantTokens" in body:
        p.string_list(body, "GrantTokens", max_items=10)
    for name in algorithms:
        if p.string(body, name, max_len=64, default=ALGORITHM) != ALGORITHM:
            raise InvalidKeyUsage(f"{name} must be {ALGORITHM} for a symmetric key")
    if p.boolean(body, "DryRun", False):
        raise Unsupported("DryRun is not supported by this KMS")


def integer(body: p.Body, name: str, low: int, high: int, default: int) -> int:
    if name not in body:
        return default
    value = p.integer(body, name)
    if not low <= value <= high:
        raise Validation(f"{name} must be between {low} and {high}")
    return value


# -- responses -------------------------------------------------------------------------


def epoch(when: datetime) -> float:
    """Seconds since the epoch (naive datetimes from the database are UTC)."""
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def key_metadata(key: Key, arns: Arns) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "AWSAccountId": arns.account,
        "KeyId": key.key_id,
        "Arn": arns.key(key.key_id),
        "CreationDate": epoch(key.created_at),
        "Enabled": key.state is KeyState.ENABLED,
        "Description": key.description,
        "KeyUsage": "ENCRYPT_DECRYPT",
        "KeyState": STATES[key.state],
        "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": ALGORITHM,
        "KeySpec": ALGORITHM,
        "EncryptionAlgorithms": [ALGORITHM],
        "MultiRegion": False,
    }
    if key.deletion_date is not None:
        metadata["DeletionDate"] = epoch(key.deletion_date)
    return metadata


def page(
    body: p.Body,
    name: str,
    items: Sequence[T],
    marker_of: Callable[[T], str],
    shape: Callable[[T], dict[str, Any]],
) -> dict[str, Any]:
    """``{name: [...], Truncated, NextMarker?}``: ``Limit`` (1..1000, default 100) items
    from ``Marker`` on, each shaped by ``shape``; the marker is the id of the first item
    of the next page."""
    limit = integer(body, "Limit", 1, 1000, 100)
    start = 0
    marker = p.string(body, "Marker", max_len=1024)
    if marker is not None:
        found = [i for i, item in enumerate(items) if marker_of(item) == marker]
        if not found:
            raise InvalidMarker("Marker is not one this KMS gave")
        start = found[0]
    chunk = [shape(item) for item in items[start : start + limit]]
    out: dict[str, Any] = {name: chunk, "Truncated": start + limit < len(items)}
    if out["Truncated"]:
        out["NextMarker"] = marker_of(items[start + limit])
    return out

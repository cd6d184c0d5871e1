"""What escrow custodians sign.

A case digest binds everything an approval agrees to. It is the SHA-256 of
``b"KMS-ESCROW-CASE-1\\n"`` followed by the canonical JSON (keys sorted, separators ``,``
and ``:``, ASCII only) of::

    case_id        str    the case
    version        int    1, then +1 at every amendment
    requester      str    principal name of the requester
    legal_basis    str    free text
    reference      str    the authority's reference
    justification  str    justification code of the unwraps
    scope          obj    {"keys": [key ids, sorted],
                           "context": {pairs every unwrap's context must contain} | null,
                           "blobs": [hex SHA-256 of each allowed blob, sorted] | null}
    max_unwraps    int
    expires_at     str    "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC)

Enrolling a custodian in a group that already has one needs an endorsement: a member's
Ed25519 signature of ``b"KMS-ESCROW-ENROL-1\n"`` followed by the canonical JSON of
``{"name", "group", "public_key" (base64)}``, so an admin cannot add custodians alone.

An approval is the raw Ed25519 signature of the 32-byte digest. A rejection signs
``b"KMS-ESCROW-REJECT-1\\n" + digest``, so neither can be replayed as the other; the case
id and version inside the digest stop replays across cases and amendments. The client
recomputes the digest from the case's fields rather than trusting the server's.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PREFIX = b"KMS-ESCROW-CASE-1\n"
REJECT_PREFIX = b"KMS-ESCROW-REJECT-1\n"
FIELDS = (
    "case_id",
    "version",
    "requester",
    "legal_basis",
    "reference",
    "justification",
    "scope",
    "max_unwraps",
    "expires_at",
)


class EscrowFormatError(ValueError):
    """The case lacks a field the digest covers."""


def case_digest(case: Mapping[str, Any]) -> bytes:
    """The 32-byte digest custodians sign (see module docstring)."""
    missing = [f for f in FIELDS if f not in case]
    if missing:
        raise EscrowFormatError("case is missing " + ", ".join(missing))
    scope = case["scope"]
    body = {name: case[name] for name in FIELDS}
    body["scope"] = {
        "keys": sorted(scope["keys"]),
        "context": scope.get("context"),
        "blobs": sorted(scope["blobs"]) if scope.get("blobs") is not None else None,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(PREFIX + text.encode("ascii")).digest()


def signed_message(digest: bytes, decision: str) -> bytes:
    """What an approval ("approve") or a rejection ("reject") signs."""
    if decision == "approve":
        return digest
    if decision == "reject":
        return REJECT_PREFIX + digest
    raise EscrowFormatError("decision must be approve or reject")


def verify(public_key: bytes, signature: bytes, digest: bytes, decision: str) -> bool:
    """True if ``signature`` is the custodian's Ed25519 signature of that decision."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, signed_message(digest, decision)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def valid_public_key(public_key: bytes) -> bool:
    """True if the bytes are a raw Ed25519 public key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key)
    except ValueError:
        return False
    return True


ENROL_PREFIX = b"KMS-ESCROW-ENROL-1\n"


def enrolment_message(name: str, group: str, public_key: bytes) -> bytes:
    """What an existing custodian signs to endorse a new one in their group."""
    body = {"group": group, "name": name, "public_key": base64.b64encode(public_key).decode()}
    return ENROL_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def verify_enrolment(
    endorser_key: bytes, signature: bytes, name: str, group: str, public_key: bytes
) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(endorser_key).verify(
            signature, enrolment_message(name, group, public_key)
        )
    except (InvalidSignature, ValueError):
        return False
    return True

"""Signed checkpoints of the audit chain head.

A checkpoint states "the chain had ``seq`` records and the last one hashed to
``record_hash``", signed by the audit key that lives in the HSM. Format version 1 fields::

    v            int   format version = 1
    seq          int   number of records covered (the seq of the last one)
    prev_seq     int   seq of the previous checkpoint (0 for the first): checkpoints form
                       a chain, so one dropped from the middle of a bundle is noticed
    record_hash  str   hex hash of record ``seq`` (which covers every earlier record)
    time         str   UTC signing time, "YYYY-MM-DDTHH:MM:SS.mmmZ"
    key_sha256   str   hex SHA-256 of the DER SubjectPublicKeyInfo of the signing key
    signature    str   base64 of the DER-encoded ECDSA P-256 / SHA-256 signature

The signed bytes are ``b"KMS-CHECKPOINT-1\\n"`` followed by the JSON text of every field
but ``signature``, with keys sorted, separators ``,`` and ``:``, ASCII only (the same
canonical JSON as audit records). Verification needs only the public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

FORMAT_VERSION = 1
PREFIX = b"KMS-CHECKPOINT-1\n"
SIGNED_FIELDS = ("v", "seq", "prev_seq", "record_hash", "time", "key_sha256")
FIELDS = (*SIGNED_FIELDS, "signature")


class CheckpointError(ValueError):
    """A checkpoint is malformed or its signature does not verify."""


def key_fingerprint(public_key_pem: bytes) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo of a PEM public key."""
    key = load_public_key(public_key_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """The audit public key; CheckpointError unless it is a PEM EC P-256 public key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise CheckpointError("the public key is not a PEM public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CheckpointError("the public key is not an EC P-256 key")
    return key


def signed_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed (see module docstring)."""
    check_shape(checkpoint, signed=False)
    body = {name: checkpoint[name] for name in SIGNED_FIELDS}
    return PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


def digest(checkpoint: Mapping[str, Any]) -> bytes:
    """SHA-256 of the signed bytes: what the HSM signs."""
    return hashlib.sha256(signed_bytes(checkpoint)).digest()


def check_shape(checkpoint: Mapping[str, Any], *, signed: bool = True) -> None:
    """CheckpointError unless every field is present with the right type."""
    want = FIELDS if signed else SIGNED_FIELDS
    if not isinstance(checkpoint, Mapping) or not set(want) <= set(checkpoint):
        raise CheckpointError("checkpoint fields missing: need " + ", ".join(want))
    extra = set(checkpoint) - set(FIELDS) - {"type"}
    if extra:
        raise CheckpointError("checkpoint has unexpected fields: " + ", ".join(sorted(extra)))
    for name in want:
        value = checkpoint[name]
        expected = int if name in ("v", "seq", "prev_seq") else str
        if type(value) is not expected:
            raise CheckpointError(f"checkpoint field {name!r} must be {expected.__name__}")
    if checkpoint["v"] != FORMAT_VERSION:
        raise CheckpointError("unknown checkpoint format version")
    if not 0 <= checkpoint["prev_seq"] < checkpoint["seq"]:
        raise CheckpointError("checkpoint needs 0 <= prev_seq < seq")


def verify(checkpoint: Mapping[str, Any], public_key: ec.EllipticCurvePublicKey) -> None:
    """Return only if ``checkpoint`` is well formed and signed by ``public_key``."""
    check_shape(checkpoint)
    try:
        signature = base64.b64decode(checkpoint["signature"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise CheckpointError("checkpoint signature is not base64") from e
    try:
        public_key.verify(signature, signed_bytes(checkpoint), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise CheckpointError("checkpoint signature does not verify") from e

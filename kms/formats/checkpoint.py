"""Signed checkpoints of the audit chain head.

A checkpoint states "the chain had ``seq`` records and the last one hashed to
``record_hash``", signed by the audit key that lives in the HSM; from format 2 on it also
states which sealed rows existed then. Fields of format version 1::

    v            int   format version = 1
    seq          int   number of records covered (the seq of the last one)
    prev_seq     int   seq of the previous checkpoint (0 for the first): checkpoints form
                       a chain, so one dropped from the middle of a bundle is noticed
    record_hash  str   hex hash of record ``seq`` (which covers every earlier record)
    time         str   UTC signing time, "YYYY-MM-DDTHH:MM:SS.mmmZ"
    key_sha256   str   hex SHA-256 of the DER SubjectPublicKeyInfo of the signing key
    signature    str   base64 of the DER-encoded ECDSA P-256 / SHA-256 signature

Format version 2 has ``v`` = 2, the same fields, and two more::

    state_seq     int  >= 0: the change ``n`` the sealed rows were at when signed (the
                       number of transactions that changed a sealed row)
    state_sha256  str  the public digest of the sealed rows at that change, 64 lowercase
                       hex (kms/formats/state.py; ``kms audit export-state`` writes the
                       rows themselves, kms/formats/state_export.py)

The signed bytes are the version's prefix, ``b"KMS-CHECKPOINT-1\\n"`` or
``b"KMS-CHECKPOINT-2\\n"``, followed by the JSON text of every field of that version but
``signature``, with keys sorted, separators ``,`` and ``:``, ASCII only (the same
canonical JSON as audit records). Each version has exactly its own fields: a format 1
checkpoint with state fields, or a format 2 one without them, is malformed. The server
signs format 2 whenever it follows the sealed state (always, in a served deployment);
format 1 checkpoints signed before keep verifying. Verification needs only the public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

FORMAT_VERSION = 2  # the newest version, what the server signs
SIGNED_FIELDS_1 = ("v", "seq", "prev_seq", "record_hash", "time", "key_sha256")
SIGNED_FIELDS_2 = (*SIGNED_FIELDS_1, "state_seq", "state_sha256")
# version -> (prefix of the signed bytes, the fields signed)
VERSIONS: dict[int, tuple[bytes, tuple[str, ...]]] = {
    1: (b"KMS-CHECKPOINT-1\n", SIGNED_FIELDS_1),
    2: (b"KMS-CHECKPOINT-2\n", SIGNED_FIELDS_2),
}
FIELDS = (*SIGNED_FIELDS_2, "signature")  # every field any version has
_INTS = frozenset({"v", "seq", "prev_seq", "state_seq"})
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint is malformed or its signature does not verify."""


def unsigned(
    seq: int,
    prev_seq: int,
    record_hash: str,
    time: str,
    key_sha256: str,
    state: tuple[int, str] | None = None,
) -> dict[str, Any]:
    """The fields of a checkpoint to sign: format 2 with ``state`` (its ``(state_seq,
    state_sha256)``), format 1 without. CheckpointError if a field is malformed."""
    cp: dict[str, Any] = {
        "v": 1 if state is None else 2,
        "seq": seq,
        "prev_seq": prev_seq,
        "record_hash": record_hash,
        "time": time,
        "key_sha256": key_sha256,
    }
    if state is not None:
        cp["state_seq"], cp["state_sha256"] = state
    check_shape(cp, signed=False)
    return cp


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
    prefix, fields = VERSIONS[checkpoint["v"]]
    body = {name: checkpoint[name] for name in fields}
    return prefix + json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")


def digest(checkpoint: Mapping[str, Any]) -> bytes:
    """SHA-256 of the signed bytes: what the HSM signs."""
    return hashlib.sha256(signed_bytes(checkpoint)).digest()


def check_shape(checkpoint: Mapping[str, Any], *, signed: bool = True) -> None:
    """CheckpointError unless ``checkpoint`` has exactly the fields of its version (a
    ``type`` too, as bundle lines have), each with the right type and range."""
    if not isinstance(checkpoint, Mapping) or "v" not in checkpoint:
        raise CheckpointError("checkpoint fields missing: need v")
    v = checkpoint["v"]
    if type(v) is not int or v not in VERSIONS:
        raise CheckpointError("unknown checkpoint format version")
    fields = VERSIONS[v][1]
    want = (*fields, "signature") if signed else fields
    if not set(want) <= set(checkpoint):
        raise CheckpointError(f"checkpoint fields missing: format {v} needs " + ", ".join(want))
    extra = set(checkpoint) - {*fields, "signature", "type"}
    if extra:
        raise CheckpointError(
            f"checkpoint has unexpected fields for format {v}: " + ", ".join(sorted(extra))
        )
    for name in want:
        expected = int if name in _INTS else str
        if type(checkpoint[name]) is not expected:
            raise CheckpointError(f"checkpoint field {name!r} must be {expected.__name__}")
    if not 0 <= checkpoint["prev_seq"] < checkpoint["seq"]:
        raise CheckpointError("checkpoint needs 0 <= prev_seq < seq")
    if v >= 2:
        if checkpoint["state_seq"] < 0:
            raise CheckpointError("checkpoint needs state_seq >= 0")
        if not _HEX64.fullmatch(checkpoint["state_sha256"]):
            raise CheckpointError("checkpoint field 'state_sha256' must be 64 lowercase hex")


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

"""The operation registry of the AWS KMS face, and its crypto operations (Encrypt,
Decrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext, ReEncrypt).

Each operation parses its fields, calls one service method and shapes the answer; roles,
grants, key states and crypto stay in the services. Blobs are the native blob format
(kms/formats/blob.py); key ids in answers are key ARNs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from flask import current_app

from kms.api import aws_shapes as s
from kms.api import parsing as p
from kms.api.aws_errors import Unsupported, Validation
from kms.api.context import caller, services
from kms.api.parsing import encode
from kms.errors import ClientError
from kms.services import key_use
from kms.services.aws_kms import AwsKeyService
from kms.services.crypto import (
    MAX_DATAKEY_BYTES,
    MAX_PLAINTEXT,
    DataKeyRequest,
    DecryptRequest,
    EncryptRequest,
    RewrapRequest,
)

MAX_AWS_BLOB = 6144  # CiphertextBlob limit of the AWS model
DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
R = TypeVar("R")


@dataclass(frozen=True)
class Face:
    """What the operations need besides the services: ARNs and the face's key reads."""

    arns: s.Arns
    keys: AwsKeyService


Handler = Callable[[p.Body, Face], dict[str, Any]]


@dataclass(frozen=True)
class Op:
    native: str  # the audited operation name (g.operation)
    allowed: frozenset[str]
    required: frozenset[str]
    handler: Handler


OPERATIONS: dict[str, Op] = {}


def op(name: str, native: str, allowed: str, required: str = "") -> Callable[[Handler], Handler]:
    """Register ``TrentService.<name>``, audited as ``native``, taking the fields named in
    ``allowed`` (space-separated) of which ``required`` must be present."""

    def wrap(handler: Handler) -> Handler:
        fields = frozenset(allowed.split())
        OPERATIONS[name] = Op(native, fields, frozenset(required.split()), handler)
        return handler

    return wrap


def face() -> Face:
    return cast(Face, current_app.extensions["kms_aws"])


def one(results: Sequence[R | ClientError]) -> R:
    """The single result of a one-item service call; its client error is raised."""
    (result,) = results
    if isinstance(result, ClientError):
        raise result
    return result


# -- data keys and small secrets -------------------------------------------------------


@op(
    "Encrypt",
    "encrypt",
    "KeyId Plaintext EncryptionContext GrantTokens EncryptionAlgorithm DryRun",
    "KeyId Plaintext",
)
def encrypt(body: p.Body, f: Face) -> dict[str, Any]:
    s.common(body, "EncryptionAlgorithm")
    ref = s.key_ref(body, "KeyId", f.arns, aliases=True)
    item = EncryptRequest(
        s.blob(body, "Plaintext", max_bytes=MAX_PLAINTEXT), s.context(body, "EncryptionContext")
    )
    sealed = one(services().crypto.encrypt(caller(), ref, [item], key_use.Face.AWS))
    return {
        "CiphertextBlob": encode(sealed.ciphertext),
        "KeyId": f.arns.key(sealed.key_id),
        "EncryptionAlgorithm": s.ALGORITHM,
    }


@op(
    "Decrypt",
    "decrypt",
    "CiphertextBlob EncryptionContext GrantTokens KeyId EncryptionAlgorithm DryRun Recipient",
    "CiphertextBlob",
)
def decrypt(body: p.Body, f: Face) -> dict[str, Any]:
    if "Recipient" in body:
        raise Unsupported("Recipient (attested enclaves) is not supported by this KMS")
    s.common(body, "EncryptionAlgorithm")
    item = DecryptRequest(
        s.blob(body, "CiphertextBlob", max_bytes=MAX_AWS_BLOB),
        s.context(body, "EncryptionContext"),
        expected_key=s.optional_key_ref(body, "KeyId", f.arns),
    )
    opened = one(services().crypto.decrypt(caller(), [item], key_use.Face.AWS))
    return {
        "KeyId": f.arns.key(opened.key_id),
        "Plaintext": encode(opened.plaintext),
        "EncryptionAlgorithm": s.ALGORITHM,
    }


def _datakey(body: p.Body, f: Face, include_plaintext: bool) -> dict[str, Any]:
    if "Recipient" in body:
        raise Unsupported("Recipient (attested enclaves) is not supported by this KMS")
    s.common(body)
    ref = s.key_ref(body, "KeyId", f.arns, aliases=True)
    if ("NumberOfBytes" in body) == ("KeySpec" in body):
        raise Validation("give exactly one of NumberOfBytes and KeySpec")
    if "KeySpec" in body:
        spec = p.string(body, "KeySpec", max_len=16) or ""
        if spec not in DATA_KEY_SPECS:
            raise Validation("KeySpec must be AES_256 or AES_128")
        size = DATA_KEY_SPECS[spec]
    else:
        size = s.integer(body, "NumberOfBytes", 1, MAX_DATAKEY_BYTES, 0)
    item = DataKeyRequest(s.context(body, "EncryptionContext"), include_plaintext, size)
    sealed = one(services().crypto.datakey(caller(), ref, [item], key_use.Face.AWS))
    out = {"CiphertextBlob": encode(sealed.ciphertext), "KeyId": f.arns.key(sealed.key_id)}
    if sealed.plaintext is not None:
        out["Plaintext"] = encode(sealed.plaintext)
    return out


_DATAKEY_FIELDS = "KeyId EncryptionContext NumberOfBytes KeySpec GrantTokens DryRun"


@op("GenerateDataKey", "datakey", _DATAKEY_FIELDS + " Recipient", "KeyId")
def generate_data_key(body: p.Body, f: Face) -> dict[str, Any]:
    return _datakey(body, f, include_plaintext=True)


@op("GenerateDataKeyWithoutPlaintext", "datakey", _DATAKEY_FIELDS, "KeyId")
def generate_data_key_without_plaintext(body: p.Body, f: Face) -> dict[str, Any]:
    return _datakey(body, f, include_plaintext=False)


@op(
    "ReEncrypt",
    "rewrap",
    "CiphertextBlob SourceEncryptionContext SourceKeyId DestinationKeyId "
    "DestinationEncryptionContext SourceEncryptionAlgorithm DestinationEncryptionAlgorithm "
    "GrantTokens DryRun",
    "CiphertextBlob DestinationKeyId",
)
def re_encrypt(body: p.Body, f: Face) -> dict[str, Any]:
    """The destination context is DestinationEncryptionContext (none if absent), as on
    AWS; changing the context or the key needs the decrypt grant on the source key."""
    s.common(body, "SourceEncryptionAlgorithm", "DestinationEncryptionAlgorithm")
    item = RewrapRequest(
        s.blob(body, "CiphertextBlob", max_bytes=MAX_AWS_BLOB),
        s.context(body, "SourceEncryptionContext"),
        s.key_ref(body, "DestinationKeyId", f.arns, aliases=True),
        destination_context=s.context(body, "DestinationEncryptionContext"),
        expected_key=s.optional_key_ref(body, "SourceKeyId", f.arns),
    )
    sealed = one(services().crypto.rewrap(caller(), [item], key_use.Face.AWS))
    assert sealed.source_key_id is not None
    return {
        "CiphertextBlob": encode(sealed.ciphertext),
        "SourceKeyId": f.arns.key(sealed.source_key_id),
        "KeyId": f.arns.key(sealed.key_id),
        "SourceEncryptionAlgorithm": s.ALGORITHM,
        "DestinationEncryptionAlgorithm": s.ALGORITHM,
    }

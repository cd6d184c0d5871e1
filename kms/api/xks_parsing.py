"""Reading XKS proxy API requests (spec v1.0.3) into plain request objects.

Each function raises InvalidRequest (400 ValidationException) for a body the spec does
not allow, and Unsupported (501 UnsupportedOperationException) for one the spec allows
but this proxy does not take (beyond its limits). Unknown fields, in ``requestMetadata``
and at the top level, are ignored: AWS may add some.
"""

from __future__ import annotations

import json
from typing import Any, cast

from flask import request

from kms.api import parsing as p
from kms.errors import ClientError, InvalidRequest
from kms.formats import xks as fmt
from kms.formats.xks import RequestMetadata
from kms.services.xks import DecryptRequest, EncryptRequest

MAX_BODY = 128 * 1024
MAX_ARN = 2048


class Unsupported(ClientError):
    """A request beyond what this proxy supports (above the spec's minimums)."""

    status = 501
    code = "unsupported"
    public_message = "this request exceeds what this proxy supports"


def body() -> dict[str, Any]:
    """The request's JSON object, at most MAX_BODY bytes."""
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY:
        raise Unsupported(f"the body must be at most {MAX_BODY} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def metadata(
    body: dict[str, Any], principal: bool = False, key_arn: bool = False
) -> RequestMetadata:
    """Parse ``requestMetadata``; ``awsPrincipalArn`` and ``kmsKeyArn`` are required when
    ``principal`` and ``key_arn`` say so (the operations whose spec requires them)."""
    data = body.get("requestMetadata")
    if not isinstance(data, dict):
        raise InvalidRequest("requestMetadata must be an object")
    for optional in ("awsSourceVpc", "awsSourceVpce"):
        _text(data, optional, False, MAX_ARN)
    return RequestMetadata(
        kms_request_id=cast(str, _text(data, "kmsRequestId", True, 256)),
        kms_operation=cast(str, _text(data, "kmsOperation", True, 128)),
        aws_principal_arn=_text(data, "awsPrincipalArn", principal, MAX_ARN),
        kms_key_arn=_text(data, "kmsKeyArn", key_arn, MAX_ARN),
        kms_via_service=_text(data, "kmsViaService", False, 256),
    )


def encrypt_request(body: dict[str, Any], meta: RequestMetadata) -> EncryptRequest:
    """The body of ``/encrypt``: AES_GCM, optionally a SHA_256 ciphertext data integrity
    value, the plaintext and the AAD (absent: empty)."""
    algorithm(body, "encryptionAlgorithm", "AES_GCM")
    want_cdiv = algorithm(body, "ciphertextDataIntegrityValueAlgorithm", "SHA_256", False)
    return EncryptRequest(
        meta,
        cast(bytes, b64(body, "plaintext", fmt.MAX_PLAINTEXT_BYTES)),
        b64(body, "additionalAuthenticatedData", fmt.MAX_AAD_BYTES, required=False) or b"",
        want_cdiv,
    )


def decrypt_request(body: dict[str, Any], meta: RequestMetadata) -> DecryptRequest:
    """The body of ``/decrypt``: AES_GCM, the ciphertext, a 12- or 16-byte IV, a 16-byte
    tag, the AAD (absent: empty) and the ciphertext metadata (absent: None)."""
    algorithm(body, "encryptionAlgorithm", "AES_GCM")
    return DecryptRequest(
        meta,
        cast(bytes, b64(body, "ciphertext", fmt.MAX_PLAINTEXT_BYTES)),
        cast(bytes, b64(body, "initializationVector", 16, spec_limit=True, sizes=(12, 16))),
        cast(bytes, b64(body, "authenticationTag", 16, spec_limit=True, sizes=(16,))),
        b64(body, "additionalAuthenticatedData", fmt.MAX_AAD_BYTES, required=False) or b"",
        b64(
            body,
            "ciphertextMetadata",
            fmt.MAX_CIPHERTEXT_METADATA_BYTES,
            required=False,
            spec_limit=True,
        ),
    )


def b64(
    body: dict[str, Any],
    name: str,
    max_bytes: int,
    *,
    required: bool = True,
    spec_limit: bool = False,
    sizes: tuple[int, ...] = (),
) -> bytes | None:
    """Standard base64 (with padding) of at most ``max_bytes``; over it: 400 if the spec
    sets the limit (``spec_limit``), else 501 (our limit)."""
    if body.get(name) is None:
        if required:
            raise InvalidRequest(f"{name} is required")
        return None
    too_big = InvalidRequest if spec_limit else Unsupported
    decoded = p.b64(body, name, max_bytes=max_bytes, too_big=too_big)
    if sizes and len(decoded) not in sizes:
        raise InvalidRequest(f"{name} must be " + " or ".join(map(str, sizes)) + " bytes")
    return decoded


def algorithm(body: dict[str, Any], name: str, allowed: str, required: bool = True) -> bool:
    """Whether the field is present; it must name ``allowed`` (the only one supported)."""
    value = body.get(name)
    if value is None and not required:
        return False
    if value != allowed:
        raise InvalidRequest(f"{name} must be {allowed}")
    return True


def _text(data: dict[str, Any], name: str, required: bool, max_len: int) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"requestMetadata.{name} is required")
        return None
    if not isinstance(value, str) or (required and not value):
        raise InvalidRequest(f"requestMetadata.{name} must be a non-empty string")
    if len(value) > max_len:
        raise InvalidRequest(f"requestMetadata.{name} must be at most {max_len} characters")
    return value

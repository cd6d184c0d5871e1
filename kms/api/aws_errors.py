"""Errors of the AWS KMS face: AWS's exception names in ``{"__type", "message"}``.

botocore picks the exception class from ``__type``, so boto3 raises the modeled
exceptions (``kms.exceptions.NotFoundException`` ...); names AWS does not model for KMS
(ValidationException, AccessDeniedException, the SigV4 failures) arrive as a plain
``ClientError`` with that code. Client errors answer 400 (botocore retries 5xx and
throttling, nothing else); server faults answer 500 with KMSInternalException,
DependencyTimeoutException or KeyUnavailableException, which botocore retries.

Every refusal still goes through kms.api.errors.error_response, so it is audited (or, for
failed authentication, logged) exactly as on the native API.
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, g
from werkzeug.exceptions import HTTPException

from kms.api.context import request_id
from kms.api.errors import error_response
from kms.errors import (
    ChangeProposed,
    ClientError,
    Conflict,
    DecryptionFailed,
    Forbidden,
    HsmUnavailable,
    KeyStateError,
    KeyVersionRetired,
    KmsError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    StorageUnavailable,
    Unauthenticated,
    WrongKey,
)
from kms.services.aws_kms import AliasExists
from kms.services.sigv4 import SigV4Refused

log = logging.getLogger("kms.api")
CONTENT_TYPE = "application/x-amz-json-1.1"
# Native operations that use a key (DisabledException when it is disabled).
USE_OPERATIONS = frozenset({"datakey", "encrypt", "decrypt", "rewrap", "rotate_key"})


class AwsError(ClientError):
    """A refusal that only the AWS face makes, named by its AWS exception."""

    aws_type = "ValidationException"


class Validation(AwsError):
    pass


class Serialization(AwsError):
    aws_type = "SerializationException"


class UnknownOperation(AwsError):
    aws_type = "UnknownOperationException"
    code = "unknown_operation"


class Unsupported(AwsError):
    aws_type = "UnsupportedOperationException"
    code = "unsupported_operation"


class InvalidMarker(AwsError):
    aws_type = "InvalidMarkerException"


class InvalidAliasName(AwsError):
    aws_type = "InvalidAliasNameException"


class InvalidArn(AwsError):
    aws_type = "InvalidArnException"


class InvalidKeyUsage(AwsError):
    aws_type = "InvalidKeyUsageException"


# SigV4Refused.reason -> (AWS error, message), as AWS answers these failures.
_SIGV4 = {
    "missing": ("MissingAuthenticationTokenException", "Missing Authentication Token"),
    "malformed": (
        "IncompleteSignatureException",
        "The Authorization header or X-Amz-Date is malformed or incomplete.",
    ),
    "wrong_service": (
        "InvalidSignatureException",
        "Credential should be scoped to correct service: 'kms'.",
    ),
    "wrong_region": ("InvalidSignatureException", "Credential should be scoped to a valid region."),
    # in the words AWS uses for an unsigned Host header
    "unsigned_header": (
        "InvalidSignatureException",
        "'Content-Type' and 'X-Amz-Target' must be 'SignedHeaders' in the AWS Authorization.",
    ),
    "expired": (
        "InvalidSignatureException",
        "Signature expired: the request time is more than 5 minutes from the server's time.",
    ),
    "unknown_key": (
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    ),
    "bad_signature": (
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature you provided. "
        "Check your AWS Secret Access Key and signing method.",
    ),
    # boto3 signs no nonce: two identical calls in the same second carry one signature.
    # A retryable error makes botocore sign the call again (a new X-Amz-Date after its
    # backoff), so a legitimate repeat succeeds and a replay by a third party opens nothing.
    "replayed": (
        "ThrottlingException",
        "This signed request was already received; sign it again (retry).",
    ),
}


def aws_error(err: KmsError) -> tuple[str, int, str]:
    """(AWS exception name, HTTP status, message) for any error of this service."""
    if isinstance(err, ServerError):
        message = f"{err.public_message} (request id {request_id()})"
        if isinstance(err, StorageUnavailable):
            return "DependencyTimeoutException", 500, message
        if isinstance(err, HsmUnavailable):
            return "KeyUnavailableException", 500, message
        return "KMSInternalException", 500, message
    if isinstance(err, SigV4Refused):
        name, message = _SIGV4.get(err.reason, _SIGV4["bad_signature"])
        return name, 400, message
    if isinstance(err, ChangeProposed):  # AWS has no "accepted, pending approvals"
        change = err.change.get("change_id")
        return "AccessDeniedException", 400, f"{err.message}: change {change} (/v1/changes)"
    return _client_type(err), 400, err.message


def _client_type(err: KmsError) -> str:
    if isinstance(err, AwsError):
        return err.aws_type
    if isinstance(err, Unauthenticated):
        return "UnrecognizedClientException"
    if isinstance(err, DecryptionFailed):
        return "InvalidCiphertextException"
    if isinstance(err, WrongKey):
        return "IncorrectKeyException"
    if isinstance(err, KeyVersionRetired):
        return "KMSInvalidStateException"
    if isinstance(err, KeyStateError):
        # KeyStateError.of() records the state in ``detail``. AWS names a disabled key with
        # its own exception when it is used; a lifecycle change from the wrong state (say,
        # CancelKeyDeletion of a disabled key) is KMSInvalidStateException.
        disabled = err.detail == "state=disabled" and g.get("operation") in USE_OPERATIONS
        return "DisabledException" if disabled else "KMSInvalidStateException"
    if isinstance(err, AliasExists):
        return "AlreadyExistsException"
    if isinstance(err, NotFound):
        return "NotFoundException"
    if isinstance(err, Forbidden):
        return "AccessDeniedException"
    if isinstance(err, RateLimited):
        return "ThrottlingException"
    if isinstance(err, Conflict):
        return "ConflictException"
    return "ValidationException"


def aws_response(body: dict[str, object], status: int = 200) -> Response:
    response = Response(json.dumps(body), status=status, content_type=CONTENT_TYPE)
    response.headers["x-amzn-RequestId"] = request_id()
    return response


def _answer(err: KmsError) -> Response:
    error_response(err)  # log, label the metrics (the service layer audited it); body unused
    name, status, message = aws_error(err)
    return aws_response({"__type": name, "message": message}, status)


def http_error(err: HTTPException) -> KmsError:
    """The AWS face's error for a werkzeug HTTPException."""
    if err.code == 413:
        return PayloadTooLarge("the request body is too large")
    return Validation("the request could not be read")


def register(bp: Blueprint) -> None:
    """Answer every error raised in ``bp``'s views in AWS's shape."""

    @bp.errorhandler(KmsError)
    def _kms(err: KmsError) -> Response:
        return _answer(err)

    @bp.errorhandler(HTTPException)
    def _http(err: HTTPException) -> Response:
        return _answer(http_error(err))

    @bp.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        log.exception("unexpected error", extra={"error": type(err).__name__})
        return _answer(ServerError(detail=type(err).__name__))

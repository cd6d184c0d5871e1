"""The AWS External Key Store (XKS) proxy API face, spec v1.0.3: routing, authentication,
the views and the spec's error answers. Request bodies are read by kms/api/xks_parsing.py;
the admin endpoints of the per-key XKS policy are in kms/api/xks_policy.py, registered by
``blueprint`` here with the face.

XKS (SigV4, service ``kms-xks-proxy``), all ``POST`` under ``<KMS_XKS_URI_PREFIX>/kms/xks/v1``:
``/health``, ``/keys/<externalKeyId>/metadata``, ``/encrypt``, ``/decrypt`` (wire format in
kms/formats/xks.py). A request is checked in this order: path (an unknown path under the
prefix, or any path holding ``/kms/xks/v1`` under another prefix: 404
InvalidUriPathException; another method: 405), body size, SigV4 signature, body, then the
service (kms/services/xks.py). The SigV4 scope must name service ``kms-xks-proxy`` and the
region KMS_XKS_REGION (default KMS_AWS_REGION): the region of the AWS KMS that calls this
proxy. Unknown fields, in ``requestMetadata`` and at the top level, are ignored (AWS may
add some); unknown ``kmsOperation`` values are accepted.

Errors are ``{"errorName", "errorMessage"}`` on one line (compact JSON), with these
statuses:

=====================================  ===  =============================================
cause                                  HTTP errorName
=====================================  ===  =============================================
malformed JSON, missing or wrong-typed 400  ValidationException
field, bad base64, IV not 12 or 16
bytes, tag not 16 bytes, metadata over
20 bytes, algorithm not AES_GCM/SHA_256
key disabled, pending deletion or      400  InvalidStateException
destroyed; ciphertext version retired
wrong AAD, IV, tag or metadata         400  InvalidCiphertextException
XKS usage of the key refuses it        400  InvalidKeyUsageException
SigV4 missing, bad, expired, replayed, 401  AuthenticationFailedException
wrong service or region, unknown or
revoked key
no xks grant for the operation (the    403  AccessDeniedException
principal holds another grant on the
key); XKS policy refuses the AWS
principal or the KMS operation
unknown external key id, or a key the  404  KeyNotFoundException
principal holds no grant on at all
(one answer: NoGrant)
unknown path                           404  InvalidUriPathException
method other than POST                 405  UnsupportedOperationException
plaintext or ciphertext over 8192      501  UnsupportedOperationException
bytes, AAD over 16384, body over 128 KiB
HSM, database or replay store down     503  DependencyTimeoutException
any other server failure               500  InternalException
=====================================  ===  =============================================

The replay store (the nonce table in the database) being down is a dependency failure:
the request is refused (fail closed) with 503 DependencyTimeoutException, which AWS KMS
treats as retryable, unlike an authentication failure.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, Response, current_app, g, request
from flask.sansio.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.exceptions import MethodNotAllowed as RoutingMethodNotAllowed

from kms.api import errors, xks_policy
from kms.api import parsing as p
from kms.api import xks_parsing as xp
from kms.api.context import audited, caller, services
from kms.api.sigv4 import authenticate
from kms.api.throttle import admit
from kms.api.xks_parsing import MAX_BODY, Unsupported
from kms.errors import (
    ClientError,
    Conflict,
    DecryptionFailed,
    Forbidden,
    InvalidRequest,
    KeyStateError,
    KeyUsageRefused,
    KmsError,
    MethodNotAllowed,
    NoGrant,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthenticated,
)
from kms.formats import xks as fmt

log = logging.getLogger("kms.api.xks")
SERVICE = "kms-xks-proxy"
REGION = "kms_xks_region"  # app.extensions key: the region SigV4 scopes must name
F = TypeVar("F", bound=Callable[..., Any])


class InvalidUriPath(NotFound):
    code = "invalid_uri_path"
    public_message = "no such XKS API path"


# First match wins: subclasses before their bases.
_ERRORS: tuple[tuple[type[KmsError], int, str], ...] = (
    (Unauthenticated, 401, "AuthenticationFailedException"),
    (KeyUsageRefused, 400, "InvalidKeyUsageException"),
    (DecryptionFailed, 400, "InvalidCiphertextException"),
    (InvalidUriPath, 404, "InvalidUriPathException"),
    (NotFound, 404, "KeyNotFoundException"),
    (NoGrant, 404, "KeyNotFoundException"),  # the same answer as a key that does not exist
    (Forbidden, 403, "AccessDeniedException"),
    (MethodNotAllowed, 405, "UnsupportedOperationException"),
    (Unsupported, 501, "UnsupportedOperationException"),
    (PayloadTooLarge, 501, "UnsupportedOperationException"),
    (RateLimited, 429, "ThrottlingException"),
    (KeyStateError, 400, "InvalidStateException"),
    (Conflict, 400, "InvalidStateException"),  # includes KeyVersionRetired
    (ClientError, 400, "ValidationException"),
)


def error_name(err: KmsError) -> tuple[int, str]:
    """The spec's HTTP status and errorName for ``err``."""
    for cls, status, name in _ERRORS:
        if isinstance(err, cls):
            return status, name
    if err.status == 503:
        return 503, "DependencyTimeoutException"
    return 500, "InternalException"


def blueprint(prefix: str, region: str = "us-east-1") -> Blueprint:
    """The XKS face under ``<prefix>/kms/xks/v1`` (``prefix`` as KMS_XKS_URI_PREFIX, checked
    by formats.xks.check_uri_prefix), accepting SigV4 scopes of ``region`` only
    (KMS_XKS_REGION), and the policy endpoints under ``/v1``."""
    prefix = fmt.check_uri_prefix(prefix)
    face = Blueprint("face", __name__, url_prefix=prefix + fmt.API_PATH)

    @face.record_once
    def _setup(state: BlueprintSetupState) -> None:
        cast(Flask, state.app).extensions[REGION] = region

    for rule, view in (
        ("/health", health),
        ("/keys/<external_key_id>/metadata", key_metadata),
        ("/keys/<external_key_id>/encrypt", encrypt),
        ("/keys/<external_key_id>/decrypt", decrypt),
    ):
        face.add_url_rule(rule, view_func=view, methods=["POST"], provide_automatic_options=False)
    face.register_error_handler(Exception, _error)

    @face.before_app_request
    def _unknown_path() -> Response | None:
        """Paths of the XKS API that routed nowhere: answered before authentication."""
        failed = request.routing_exception
        if failed is None or not _is_xks_path(request.path, prefix):
            return None
        if isinstance(failed, RoutingMethodNotAllowed):
            response = _respond(_body_of(MethodNotAllowed("only POST is allowed")), 405)
            response.headers["Allow"] = "POST"
            return response
        return _respond(_body_of(InvalidUriPath()), 404)

    parent = Blueprint("xks", __name__)
    parent.register_blueprint(face)
    parent.register_blueprint(xks_policy.blueprint())
    return parent


def _is_xks_path(path: str, prefix: str) -> bool:
    under_prefix = bool(prefix) and (path == prefix or path.startswith(prefix + "/"))
    return under_prefix or fmt.API_PATH + "/" in path or path.endswith(fmt.API_PATH)


# -- errors ---------------------------------------------------------------------------------


def _error(err: Exception) -> Response:
    """Any exception of the XKS face, answered in the spec's shape (its audit record was
    written by the service layer's scope, with the request metadata once it was parsed)."""
    if isinstance(err, KmsError):
        error = err
    elif isinstance(err, HTTPException):
        error = _http_error(err)
    else:
        log.exception("unexpected error", extra={"error": type(err).__name__})
        error = ServerError(detail=type(err).__name__)
    errors.error_response(error)  # log line, metrics outcome (the service layer audited it)
    return _respond(_body_of(error), error_name(error)[0])


def _http_error(err: HTTPException) -> KmsError:
    if isinstance(err, RequestEntityTooLarge):
        return Unsupported("the request body is too large")
    return InvalidRequest("the request could not be read")


# What a principal without a grant is told, whether or not the key exists (NoGrant).
NO_SUCH_KEY = "no such key for this credential"


def _body_of(error: KmsError) -> dict[str, str]:
    message = error.message if isinstance(error, ClientError) else error.public_message
    if isinstance(error, NoGrant | NotFound) and not isinstance(error, InvalidUriPath):
        message = NO_SUCH_KEY
    text = "".join(c if " " <= c <= "~" else "?" for c in message)[:500]
    return {"errorName": error_name(error)[1], "errorMessage": text}


def _respond(body: dict[str, Any], status: int = 200) -> Response:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True)
    return Response(text, status=status, mimetype="application/json")


# -- the operation wrapper -----------------------------------------------------------------


def _face(name: str) -> Callable[[F], F]:
    """An XKS operation: body size and key id checked, then ``g.operation`` set and the
    SigV4 signature verified (``caller()`` is the credential's principal); the view runs
    in the service layer's audited scope."""

    def wrap(view: F) -> F:
        @functools.wraps(view)
        def inner(**kwargs: Any) -> Any:
            key_id = kwargs.get("external_key_id")
            if key_id is not None and not fmt.EXTERNAL_KEY_ID.fullmatch(key_id):
                raise InvalidUriPath("externalKeyId must be 1-128 of [A-Za-z0-9._-]")
            if request.content_length is not None and request.content_length > MAX_BODY:
                raise Unsupported(f"the body must be at most {MAX_BODY} bytes")
            g.operation = name
            region = current_app.extensions[REGION]
            # the unit of work records the nonce
            verified = authenticate(SERVICE, region, defer_nonce=True)
            with audited(name, _http_error):
                admit(verified.principal)  # 429 over the principal's rate limit
                return view(**kwargs)

        return cast(F, inner)

    return wrap


# -- XKS views ------------------------------------------------------------------------------


@_face("xks_health")
def health() -> Response:
    meta = xp.metadata(xp.body())
    with services().xks.request(caller(), "xks_health", meta):
        out = services().xks.health(caller(), meta)
    return _respond(
        {
            "xksProxyFleetSize": out.fleet_size,
            "xksProxyVendor": out.proxy_vendor,
            "xksProxyModel": out.proxy_model,
            "ekmVendor": out.ekm_vendor,
            "ekmFleetDetails": [
                {"id": out.ekm_id, "model": out.ekm_model, "healthStatus": out.status}
            ],
        }
    )


@_face("xks_metadata")
def key_metadata(external_key_id: str) -> Response:
    meta = xp.metadata(xp.body(), principal=True)
    with services().xks.request(caller(), "xks_metadata", meta):
        out = services().xks.metadata(caller(), external_key_id, meta)
    return _respond(
        {"keySpec": out.key_spec, "keyUsage": list(out.key_usage), "keyStatus": out.key_status}
    )


@_face("xks_encrypt")
def encrypt(external_key_id: str) -> Response:
    body = xp.body()
    meta = xp.metadata(body, principal=True, key_arn=True)
    with services().xks.request(caller(), "xks_encrypt", meta):
        request_ = xp.encrypt_request(body, meta)
        out = services().xks.encrypt(caller(), external_key_id, request_)
    response = {
        "authenticationTag": p.encode(out.tag),
        "ciphertext": p.encode(out.ciphertext),
        "ciphertextMetadata": p.encode(out.ciphertext_metadata),
        "initializationVector": p.encode(out.iv),
    }
    if out.cdiv is not None:
        response["ciphertextDataIntegrityValue"] = p.encode(out.cdiv)
    return _respond(response)


@_face("xks_decrypt")
def decrypt(external_key_id: str) -> Response:
    body = xp.body()
    meta = xp.metadata(body, principal=True, key_arn=True)
    with services().xks.request(caller(), "xks_decrypt", meta):
        request_ = xp.decrypt_request(body, meta)
        plaintext = services().xks.decrypt(caller(), external_key_id, request_)
    return _respond({"plaintext": p.encode(plaintext)})

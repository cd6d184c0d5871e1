"""SigV4 authentication for the AWS-compatible faces (XKS proxy API, AWS KMS JSON API),
and the admin endpoints that issue and revoke SigV4 credentials."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, request

from kms.api import parsing as p
from kms.api.context import caller, operation, request_id, services
from kms.services.audit_events import Caller
from kms.services.sigv4 import SignedRequest, Verified, check_access_key_id

bp = Blueprint("sigv4", __name__, url_prefix="/v1")
Json = tuple[dict[str, Any], int] | dict[str, Any]


def signed_request() -> SignedRequest:
    """The request as the client signed it: the path as sent (not decoded: gunicorn's
    ``RAW_URI``, else the server's ``REQUEST_URI``), the raw query string, lowercased
    headers, the raw body."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    path = raw.partition("?")[0] if raw else request.environ.get("PATH_INFO", "/")
    query = request.environ.get("QUERY_STRING", "")
    headers = {k.lower(): v for k, v in request.headers.items()}
    return SignedRequest(request.method, path, query, headers, request.get_data(cache=True))


def authenticate(
    service: str, region: str, defer_nonce: bool = False, signed: tuple[str, ...] = ()
) -> Verified:
    """Verify the request's SigV4 signature for ``service`` in ``region`` (with at least
    the headers ``signed`` signed) and set ``caller()``; SigV4Refused (401) otherwise. The
    face then counts the request against the principal's rate limit inside its audited
    scope. ``defer_nonce`` only for views whose every success goes through the audited
    unit of work, which records the deferred nonce (kms/services/sigv4.py)."""
    g.caller = Caller(request_id(), None)
    verified = services().sigv4.verify(
        signed_request(), service, defer_nonce, region=region, signed=signed
    )
    g.caller = Caller(request_id(), verified.principal, verified.deferred)
    return verified


@bp.post("/principals/<name>/sigv4-credentials")
@operation("issue_sigv4_credential")
def issue(name: str) -> Json:
    """-> 201 ``{access_key_id, secret_access_key}``; the secret is shown only here."""
    p.json_body(set())
    access_key_id, secret = services().sigv4.issue(caller(), name)
    return {"access_key_id": access_key_id, "secret_access_key": secret}, 201


@bp.delete("/principals/<name>/sigv4-credentials/<access_key_id>")
@operation("revoke_sigv4_credential")
def revoke(name: str, access_key_id: str) -> Json:
    services().sigv4.revoke(caller(), name, check_access_key_id(access_key_id))
    return {"access_key_id": access_key_id, "state": "revoked"}

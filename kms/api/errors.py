"""One place that turns exceptions into ``{"error": {"code", "message", "request_id"}}``.

Client errors show their own safe message; server errors show a generic one. A refusal
that no service recorded yet (bad input, wrong role) is handed to the audit trail under
the view's operation name, so every refused operation of an authenticated caller leaves
exactly one audit record. Failed authentication is logged, not chained: it is not
attributable to a principal, and chaining it would let anyone grow the audit trail.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from kms.api.context import request_id, services
from kms.errors import (
    ClientError,
    InvalidRequest,
    KmsError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    Unauthenticated,
)
from kms.services.audit import Caller

log = logging.getLogger("kms.api")

_HTTP = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}


def error_response(err: KmsError) -> tuple[Response, int]:
    operation = g.get("operation")
    g.error_code = err.code  # the outcome label of kms_requests_total (kms/api/metrics.py)
    if isinstance(err, Unauthenticated):
        log.warning("authentication failed", extra={"request_id": request_id(), "op": operation})
    elif operation:
        services().audit.refused(g.get("caller") or Caller(request_id(), None), operation, err)
    if isinstance(err, ServerError):
        log.warning("request failed", extra={"code": err.code, "detail": err.detail})
    message = err.message if isinstance(err, ClientError) else err.public_message
    return jsonify(error=error_body(err, message)), err.status


def error_body(err: KmsError, message: str | None = None) -> dict[str, str]:
    return {"code": err.code, "message": message or err.message, "request_id": request_id()}


def register(app: Flask) -> None:
    @app.errorhandler(KmsError)
    def _kms(err: KmsError) -> tuple[Response, int]:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException) -> tuple[Response, int]:
        cls = _HTTP.get(err.code or 400, InvalidRequest)
        return error_response(cls())

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> tuple[Response, int]:
        log.exception("unexpected error", extra={"error": type(err).__name__})
        return error_response(ServerError(detail=type(err).__name__))

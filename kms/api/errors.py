"""One place that turns exceptions into ``{"error": {"code", "message", "request_id"}}``.

Client errors show their own safe message; server errors show a generic one. Nothing
here writes audit records: every view runs in the service layer's audited scope
(kms/api/context.py), which records each refused operation once. Failed authentication
is logged here, and never chained (it is not attributable to a principal).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from kms.api.context import http_error, request_id
from kms.errors import (
    ChangeProposed,
    ClientError,
    KmsError,
    RateLimited,
    ServerError,
    Unauthenticated,
)

log = logging.getLogger("kms.api")


def error_response(err: KmsError) -> tuple[Response, int]:
    g.error_code = err.code  # the outcome label of kms_requests_total (kms/api/metrics.py)
    if isinstance(err, ChangeProposed):  # not an error: recorded, pending approvals
        return jsonify(change=err.change, message=err.message), err.status
    if isinstance(err, RateLimited) and err.retry_after is not None:
        g.retry_after = err.retry_after  # the Retry-After header (kms/api/throttle.py)
    if isinstance(err, Unauthenticated):
        log.warning(
            "authentication failed", extra={"request_id": request_id(), "op": g.get("operation")}
        )
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
        return error_response(http_error(err))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> tuple[Response, int]:
        log.exception("unexpected error", extra={"error": type(err).__name__})
        return error_response(ServerError(detail=type(err).__name__))

"""The per-principal audit budget and rate limit at the HTTP edge: ``admit`` right after
authentication (kms.api.context.operation, and the XKS and AWS KMS faces once SigV4
verified), inside the audited scope so a refusal is recorded (coalesced over the audit
budget), and the Retry-After header on a 429 answer, whichever face's error handler wrote
it (kms.api.errors.error_response keeps the error's ``retry_after``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import Flask, Response, current_app, g

from kms.services.model import Principal

if TYPE_CHECKING:
    from kms.app import Services


def admit(principal: Principal) -> None:
    """Count this request against ``principal``'s audit budget and rate (the further
    items of a batch are counted by the service that runs them); AuditBudgetExceeded or
    Throttled (429) if over either."""
    services = cast("Services", current_app.extensions["kms"])
    services.cluster.admit(principal, g.caller.request_id, g.get("operation") or "", 1)


def install(app: Flask) -> None:
    @app.after_request
    def _retry_after(response: Response) -> Response:
        if "retry_after" in g:
            response.headers["Retry-After"] = str(g.retry_after)
        return response

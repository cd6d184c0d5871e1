"""The per-principal rate limit at the HTTP edge: ``admit`` right after authentication
(kms.api.context.operation, and the XKS and AWS KMS faces once SigV4 verified), inside
the audited scope so a refusal is recorded, and the Retry-After header on
the 429 answer, whichever face's error handler wrote it."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import Flask, Response, current_app, g

from kms.services.model import Principal
from kms.services.rate_limits import Throttled

if TYPE_CHECKING:
    from kms.app import Services


def admit(principal: Principal) -> None:
    """Count this request against ``principal``'s rate; Throttled (429) if over it."""
    try:
        cast("Services", current_app.extensions["kms"]).cluster.admit(principal)
    except Throttled as e:
        g.retry_after = e.retry_after
        raise


def install(app: Flask) -> None:
    @app.after_request
    def _retry_after(response: Response) -> Response:
        if "retry_after" in g:
            response.headers["Retry-After"] = str(g.retry_after)
        return response

"""Per-request plumbing: request id, authentication, the services container, and the
audited scope every view runs in (the service layer records a refusal, even one made
while parsing, once per request; kms/services/audit.py)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import current_app, g, request
from werkzeug.exceptions import HTTPException

from kms.api import peer
from kms.api.parsing import check_text
from kms.api.throttle import admit
from kms.errors import InvalidRequest, KmsError, MethodNotAllowed, NotFound, PayloadTooLarge
from kms.services.audit_events import Caller

if TYPE_CHECKING:
    from kms.app import Services

F = TypeVar("F", bound=Callable[..., Any])


def services() -> Services:
    return cast("Services", current_app.extensions["kms"])


def request_id() -> str:
    if "request_id" not in g:
        g.request_id = uuid.uuid4().hex
    return cast(str, g.request_id)


def caller() -> Caller:
    return cast(Caller, g.caller)


def operation(name: str) -> Callable[[F], F]:
    """Mark a view as the audited operation ``name`` and authenticate its caller.

    The bearer token is checked before anything else; the view then runs with
    ``caller()`` set, inside the service layer's audited scope of ``name``: a refusal is
    recorded there once (under the innermost service operation it reached, or ``name``).
    """

    def wrap(view: F) -> F:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any) -> Any:
            g.operation = name
            g.caller = Caller(request_id(), None)
            principal = peer.authenticate(  # bearer token and/or verified client certificate
                services().principals, request.environ, request.headers.get("Authorization")
            )
            g.caller = Caller(request_id(), principal)
            with audited(name):
                admit(principal)  # 429 over the principal's rate limit
                return view(*args, **kwargs)

        return cast(F, inner)

    return wrap


@contextmanager
def audited(
    name: str, translate: Callable[[HTTPException], KmsError] | None = None
) -> Iterator[None]:
    """Run the rest of a view in the service layer's audited scope of operation ``name``,
    werkzeug's own refusals (an unreadable or oversized body) translated into KmsErrors
    (by ``translate``, default http_error) so the scope records them under their codes.
    Path parameters and query arguments that are not plain text (NUL, control characters,
    lone surrogates) are refused here, once for every face."""
    with services().audit.operation(caller(), name):
        try:
            texts = list((request.view_args or {}).items())
            if request.environ.get("QUERY_STRING"):
                texts += request.args.items()
            for field, value in texts:
                if isinstance(value, str):  # path and query text, before any look-up
                    check_text(value, field)
            yield
        except HTTPException as e:
            raise (translate or http_error)(e) from e


def http_error(err: HTTPException) -> KmsError:
    """The KmsError of a werkzeug HTTPException."""
    return _HTTP.get(err.code or 400, InvalidRequest)()


_HTTP: dict[int, type[KmsError]] = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}

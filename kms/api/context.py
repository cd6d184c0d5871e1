"""Per-request plumbing: request id, authentication, the services container, audit of
refusals that happen before a service is reached."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import current_app, g, request

from kms.api import peer
from kms.api.throttle import admit
from kms.services.audit import Caller

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
    ``caller()`` set. Errors raised before a service recorded them are audited by the
    error handler under this operation's name.
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
            admit(principal)  # 429 over the principal's rate limit
            return view(*args, **kwargs)

        return cast(F, inner)

    return wrap

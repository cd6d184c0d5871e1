"""The principal lifecycle (``/v1/principals/<name>/...``): disable and enable, list,
issue, rotate and revoke bearer tokens, end dashboard sessions
(kms/services/principals.py). Tokens appear only in the answer that issues them; a
token is otherwise named by its id, the first 16 hex digits of its SHA-256."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from kms.api import parsing as p
from kms.api import serialize
from kms.api.context import caller, operation, services
from kms.services.tokens import MAX_GRACE_SECONDS, MAX_TTL_SECONDS

bp = Blueprint("principals", __name__, url_prefix="/v1")
Json = tuple[dict[str, Any], int] | dict[str, Any]


@bp.post("/principals/<name>/disable")
@operation("disable_principal")
def disable(name: str) -> Json:
    """-> the principal, disabled: every token, SigV4 credential, certificate and
    dashboard session of it is refused from now on, on every node."""
    p.json_body(set())
    return serialize.principal(services().principals.set_enabled(caller(), name, False))


@bp.post("/principals/<name>/enable")
@operation("enable_principal")
def enable(name: str) -> Json:
    p.json_body(set())
    return serialize.principal(services().principals.set_enabled(caller(), name, True))


@bp.post("/principals/<name>/sessions/end")
@operation("end_sessions")
def end_sessions(name: str) -> Json:
    """-> the principal; its dashboard sessions opened until now are ended."""
    p.json_body(set())
    return serialize.principal(services().principals.end_sessions(caller(), name))


@bp.get("/principals/<name>/tokens")
@operation("list_tokens")
def tokens(name: str) -> Json:
    """-> ``{tokens: [{token_id, created_at, expires_at, last_used_at}]}``."""
    found = services().principals.tokens(caller(), name)
    return {"tokens": [serialize.token(x) for x in found]}


@bp.post("/principals/<name>/tokens")
@operation("issue_token")
def issue(name: str) -> Json:
    """``{ttl_seconds?}`` -> 201 ``{token_id, ..., token}``; the token is shown only here."""
    body = p.json_body({"ttl_seconds"})
    token, found = services().principals.issue_token(caller(), name, _ttl(body))
    return {**serialize.token(found), "token": token}, 201


@bp.post("/principals/<name>/tokens/<token_id>/rotate")
@operation("rotate_token")
def rotate(name: str, token_id: str) -> Json:
    """``{grace_seconds?, ttl_seconds?}`` -> 201 the new token (shown only here); the old
    one expires ``grace_seconds`` (default 0: now) from now."""
    body = p.json_body({"grace_seconds", "ttl_seconds"})
    grace = (
        p.integer(body, "grace_seconds", (0, MAX_GRACE_SECONDS)) if "grace_seconds" in body else 0
    )
    token, found = services().principals.issue_token(
        caller(), name, _ttl(body), rotate=token_id, grace_seconds=grace
    )
    return {**serialize.token(found), "token": token, "replaces": token_id}, 201


@bp.delete("/principals/<name>/tokens/<token_id>")
@operation("revoke_token")
def revoke(name: str, token_id: str) -> Json:
    services().principals.revoke_token(caller(), name, token_id)
    return {"token_id": token_id, "state": "revoked"}


def _ttl(body: p.Body) -> int | None:
    return p.integer(body, "ttl_seconds", (60, MAX_TTL_SECONDS)) if "ttl_seconds" in body else None

"""The dashboard's principals pages and actions, on the ``dashboard`` blueprint
(kms/web/dashboard.py): the list, one principal with the ids of its tokens, and the admin
actions create, disable, enable, revoke a token, end sessions.

They call the same PrincipalService methods (and write the same audit records) as
``/v1/principals/<name>/...``; admins only here (the service would let a principal revoke
its own token or end its own sessions; auditors stay read-only in the dashboard). Creating
a service, requester or admin is a dual-control change: the form then leads to the pending
change (kms/web/dashboard_changes.py), whose proposer applies it once approved. A token is
shown only once, in the response that creates it (a principal created at once, or the
applied change); tokens are never issued or rotated here otherwise.
"""

from __future__ import annotations

from typing import Any

from flask import flash, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from kms.api.context import services
from kms.errors import NotFound
from kms.web.dashboard import (
    bp,
    caller,
    check_csrf,
    common,
    dashboard,
    require_admin,
    signed_in,
)
from kms.web.dashboard_changes import render_result


@bp.get("/principals")
@signed_in
def principals() -> str:
    found = dashboard().principals(caller())
    return render_template("dashboard/principals.html", principals=found, **common())


@bp.post("/principals")
@signed_in
def create_principal() -> Any:
    """Create a principal and show its token once; under dual control a service,
    requester or admin is a change (ChangeProposed: the change's page, see
    kms/web/dashboard_changes.py)."""
    check_csrf("create_principal")
    require_admin("create_principal")
    name, role = request.form.get("name", "").strip(), request.form.get("role", "")
    principal, token = services().principals.create(caller(), name, role)
    return render_result(
        f"Created {principal.role.value} principal {principal.name}",
        {"name": principal.name, "role": principal.role.value, "token": token},
        back=url_for(".principal", name=principal.name),
        back_label=f"Principal {principal.name}",
    )


@bp.get("/principals/<name>")
@signed_in
def principal(name: str) -> str:
    detail = dashboard().principal_detail(caller(), name)
    return render_template(
        "dashboard/principal.html", d=detail, my_token=session.get("token_id"), **common()
    )


@bp.post("/principals/<name>/disable")
@signed_in
def disable_principal(name: str) -> Any:
    """Two steps, like retire: only the confirmation page's re-submission with the box
    ticked disables the principal."""
    check_csrf("disable_principal")
    require_admin("disable_principal")
    if not _confirmed():
        return _confirm_principal("disable", name, None)
    services().principals.set_enabled(caller(), name, False)
    flash(
        f"Disabled {name}: its tokens, certificate, SigV4 credentials and dashboard "
        "sessions are refused.",
        "info",
    )
    return redirect(url_for(".principal", name=name), 303)


@bp.post("/principals/<name>/enable")
@signed_in
def enable_principal(name: str) -> Response:
    check_csrf("enable_principal")
    require_admin("enable_principal")
    services().principals.set_enabled(caller(), name, True)
    flash(f"Enabled {name}: its unexpired tokens are accepted again.", "info")
    return redirect(url_for(".principal", name=name), 303)


@bp.post("/principals/<name>/tokens/<token_id>/revoke")
@signed_in
def revoke_token(name: str, token_id: str) -> Any:
    """Two steps, like disable."""
    check_csrf("revoke_token")
    require_admin("revoke_token")
    if not _confirmed():
        return _confirm_principal("revoke", name, token_id)
    services().principals.revoke_token(caller(), name, token_id)
    flash(f"Revoked token {token_id} of {name}: it is refused from now on.", "info")
    return redirect(url_for(".principal", name=name), 303)


@bp.post("/principals/<name>/sessions/end")
@signed_in
def end_sessions(name: str) -> Response:
    check_csrf("end_sessions")
    require_admin("end_sessions")
    services().principals.end_sessions(caller(), name)
    flash(f"Ended the dashboard sessions of {name}: it must log in again.", "info")
    return redirect(url_for(".principal", name=name), 303)


def _confirmed() -> bool:
    return request.form.get("confirm") == "yes"


def _confirm_principal(action: str, name: str, token_id: str | None) -> str:
    """The confirmation page of ``action`` ("disable" or "revoke"), with an error when the
    page itself was submitted without its box ticked."""
    detail = dashboard().principal_detail(caller(), name)
    token = next((t for t in detail.tokens if t.token_id == token_id), None)
    if token_id is not None and token is None:
        raise NotFound(f"principal {name!r} has no token {token_id}")
    error = (
        "Tick the box to confirm; nothing was changed."
        if request.form.get("step") == "confirm"
        else None
    )
    return render_template(
        "dashboard/confirm_principal.html",
        action=action,
        d=detail,
        token=token,
        my_token=session.get("token_id"),
        error=error,
        **common(),
    )

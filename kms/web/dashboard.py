"""The ``dashboard`` blueprint: login, overview, key detail, audit view, principals,
actions.

Every page needs a session of an admin or an auditor; actions (rotate, retire; disable,
enable, revoke a token, end sessions) need an admin, "verify now" either. Every POST
carries the session's CSRF token, checked before anything else happens; a missing or
forged one is refused (400, audited). An expired session sends the browser to the login
page with a message and does nothing. Errors are HTML pages with the request id; nothing
here touches a backend directly. The principals pages and actions are in
kms/web/dashboard_principals.py, on the same blueprint (kms/app.py imports it).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import (
    Blueprint,
    Flask,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sansio.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from kms.api.context import audited, request_id, services
from kms.config import Settings
from kms.errors import (
    ClientError,
    Forbidden,
    HsmUnavailable,
    InvalidRequest,
    KmsError,
    Unauthenticated,
)
from kms.services.audit_events import Caller
from kms.services.dashboard import REFUSED, CsrfRefused, DashboardService
from kms.services.model import Role
from kms.web import display
from kms.web import session as sess
from kms.web.chart import usage_chart

log = logging.getLogger("kms.dashboard")
bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix=sess.PREFIX,
    template_folder="templates",
    static_folder="static",
)
F = TypeVar("F", bound=Callable[..., Any])
OUTCOME_RE = re.compile(r"[a-z_]{1,64}")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    """Wire the dashboard into the app at registration (touches no backend: the HSM is
    used only when the first dashboard request of a process needs the session key)."""
    app = cast(Flask, state.app)
    settings: Settings | None = state.options.get("settings")
    dash: DashboardService = app.extensions["kms"].dashboard
    app.extensions["kms_dashboard"] = {
        "service": dash,
        "session_seconds": settings.dashboard_session_seconds if settings else 1800,
    }
    app.session_interface = sess.DashboardSessions(
        dash.session_secret, settings.dashboard_secure_cookie if settings else True
    )


def dashboard() -> DashboardService:
    return cast(DashboardService, current_app.extensions["kms_dashboard"]["service"])


def _lifetime() -> int:
    return cast(int, current_app.extensions["kms_dashboard"]["session_seconds"])


def caller() -> Caller:
    return cast(Caller, g.caller)


# -- request plumbing ---------------------------------------------------------------------


@bp.before_request
def _before() -> None:
    g.caller = Caller(request_id(), None)
    if not sess.available():
        raise HsmUnavailable(detail="no dashboard session key")


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_field": sess.CSRF_FIELD, "refused_filter": REFUSED}


bp.add_app_template_filter(display.when, "kms_time")
bp.add_app_template_filter(display.age, "kms_age")


def signed_in(view: F) -> F:
    """Run ``view`` for a live session of an admin or auditor; otherwise redirect to the
    login page (with a message if the session expired), having done nothing."""

    @functools.wraps(view)
    def inner(*args: Any, **kwargs: Any) -> Any:
        name, role, login_at = session.get("name"), session.get("role"), session.get("login_at")
        if not isinstance(name, str) or not isinstance(role, str):
            return _to_login(None)
        now = dashboard().now().timestamp()
        if not isinstance(login_at, int | float) or now - login_at > _lifetime():
            log.info("dashboard session expired", extra={"principal": name})
            return _to_login("Your session expired. Log in again; nothing was changed.")
        token_id = session.get("token_id")
        principal = None
        if isinstance(token_id, str):
            principal = dashboard().resume(name, role, token_id, login_at)
        if principal is None:
            return _to_login("Your session is no longer valid. Log in again.")
        g.caller = Caller(request_id(), principal)
        with audited(_OPERATIONS[request.endpoint or ""]):
            return view(*args, **kwargs)

    return cast(F, inner)


def _to_login(message: str | None) -> Response:
    session.clear()
    if message:
        flash(message, "error")
    return redirect(url_for(".login"), 303)


def check_csrf(operation: str) -> None:
    """Refuse (400, audited for a signed-in caller) unless the form carries the
    session's CSRF token; called before any other work of a POST."""
    problem = sess.csrf_problem(request.form.get(sess.CSRF_FIELD))
    if problem is not None:
        log.warning("csrf refused", extra={"op": operation, "detail": problem})
        raise CsrfRefused(detail=problem)  # recorded by the view's audited scope


def require_admin(operation: str) -> None:
    """Forbidden (audited under ``operation``) unless the caller is an admin."""
    with services().audit.operation(caller(), operation):
        caller().require(Role.ADMIN)


# The audited operation of each signed-in view: the scope its refusals are recorded in
# (bad form values, say), so every refused operation of a signed-in caller leaves one record.
_OPERATIONS = {
    "dashboard.overview": "dashboard_overview",
    "dashboard.key": "dashboard_key",
    "dashboard.audit": "dashboard_audit",
    "dashboard.rotate": "rotate_key",
    "dashboard.retire": "configure_key",
    "dashboard.verify": "verify_audit",
    "dashboard.logout": "dashboard_logout",
    "dashboard.principals": "dashboard_principals",
    "dashboard.principal": "dashboard_principal",
    "dashboard.disable_principal": "disable_principal",
    "dashboard.enable_principal": "enable_principal",
    "dashboard.revoke_token": "revoke_token",
    "dashboard.end_sessions": "end_sessions",
    "dashboard.create_principal": "create_principal",
    "dashboard.changes": "dashboard_changes",
    "dashboard.change": "dashboard_change",
    "dashboard.apply_change": "apply_change",
    "dashboard.cancel_change": "cancel_change",
}


@bp.errorhandler(KmsError)
def _kms_error(err: KmsError) -> tuple[str, int]:
    if isinstance(err, ClientError):
        message = err.message
    else:
        log.warning("dashboard request failed", extra={"code": err.code, "detail": err.detail})
        message = err.public_message
    return _error_page(err.status, err.code, message)


@bp.errorhandler(HTTPException)
def _http_error(err: HTTPException) -> tuple[str, int]:
    status = err.code or 400
    return _error_page(status, "http_error", err.name)


@bp.errorhandler(Exception)
def _unexpected(err: Exception) -> tuple[str, int]:
    log.exception("unexpected dashboard error", extra={"error": type(err).__name__})
    return _error_page(500, "internal_error", "internal error")


def _error_page(status: int, code: str, message: str) -> tuple[str, int]:
    signed = g.get("caller") is not None and caller().principal is not None
    return (
        render_template(
            "dashboard/error.html",
            status=status,
            code=code,
            message=message,
            request_id=request_id(),
            signed_in=signed,
            **(common() if signed else {}),
        ),
        status,
    )


# -- login / logout -----------------------------------------------------------------------


@bp.get("/login")
def login() -> Any:
    if isinstance(session.get("name"), str):
        return redirect(url_for(".overview"), 303)
    return render_template("dashboard/login.html", csrf=sess.csrf_token())


@bp.post("/login")
def login_post() -> Any:
    check_csrf("dashboard_login")
    token = request.form.get("token", "").strip()
    try:
        principal, token_id = dashboard().login(request_id(), token)
    except Unauthenticated:
        log.warning("dashboard login refused", extra={"request_id": request_id()})
        return _login_error("That token is not valid.", 401)
    except Forbidden:
        return _login_error("That token's role may not use the dashboard.", 403)
    session.clear()  # a fresh session (and CSRF token) at every login
    session.update(
        name=principal.name,
        role=principal.role.value,
        token_id=token_id,
        login_at=dashboard().now().timestamp(),
    )
    sess.csrf_token()  # the cleared session gets a new one
    g.caller = Caller(request_id(), principal)
    return redirect(url_for(".overview"), 303)


def _login_error(message: str, status: int) -> tuple[str, int]:
    return render_template("dashboard/login.html", csrf=sess.csrf_token(), error=message), status


@bp.post("/logout")
@signed_in
def logout() -> Response:
    check_csrf("dashboard_logout")
    dashboard().logout(caller())
    session.clear()
    flash("You are logged out.", "info")
    return redirect(url_for(".login"), 303)


# -- pages --------------------------------------------------------------------------------


@bp.get("/")
@signed_in
def overview() -> str:
    data = dashboard().overview(caller())
    return render_template("dashboard/overview.html", o=data, **common())


@bp.get("/keys/<path:ref>")
@signed_in
def key(ref: str) -> str:
    detail = dashboard().key_detail(caller(), ref)
    chart = usage_chart(detail.usage.days, dashboard().now().date())
    return render_template("dashboard/key.html", d=detail, chart=chart, **common())


@bp.get("/audit")
@signed_in
def audit() -> str:
    key_ref = request.args.get("key", "").strip() or None
    outcome = request.args.get("outcome", "").strip() or None
    if key_ref is not None and len(key_ref) > 64:
        raise InvalidRequest("key must be at most 64 characters")
    if outcome is not None and not OUTCOME_RE.fullmatch(outcome):
        raise InvalidRequest("outcome must be ok, refused or an error code")
    limit = _int_arg("limit", 100, 1, 500)
    page = dashboard().audit_page(caller(), key_ref, outcome, limit)
    return render_template(
        "dashboard/audit.html",
        page=page,
        key_ref=key_ref or "",
        outcome=outcome or "",
        limit=limit,
        **common(),
    )


# -- actions ------------------------------------------------------------------------------


@bp.post("/keys/<path:ref>/rotate")
@signed_in
def rotate(ref: str) -> Response:
    check_csrf("rotate_key")
    key = services().keys.rotate(caller(), ref)
    flash(f"Rotated {key.alias or key.key_id}: version {key.current_version} is current.", "info")
    return redirect(url_for(".key", ref=ref), 303)


@bp.post("/keys/<path:ref>/retire")
@signed_in
def retire(ref: str) -> Any:
    """Two steps: the key page's form leads to a confirmation page; only its re-submission
    with the box ticked retires the versions."""
    check_csrf("configure_key")
    require_admin("configure_key")
    up_to = _form_int("up_to_version")
    if request.form.get("confirm") != "yes":
        detail = dashboard().key_detail(caller(), ref)
        error = (
            "Tick the box to confirm; nothing was changed."
            if request.form.get("step") == "confirm"
            else None
        )
        return render_template(
            "dashboard/confirm_retire.html", d=detail, up_to=up_to, error=error, **common()
        )
    key = services().keys.retire(caller(), ref, up_to)
    flash(
        f"Retired versions up to {up_to} of {key.alias or key.key_id}: "
        f"blobs under them are now refused.",
        "info",
    )
    return redirect(url_for(".key", ref=ref), 303)


@bp.post("/audit/verify")
@signed_in
def verify() -> Response:
    check_csrf("verify_audit")
    result = dashboard().verify(caller())
    flash(
        ("Audit chain verified: " if result.ok else "Audit verification FAILED: ") + result.summary,
        "info" if result.ok else "error",
    )
    return redirect(url_for(".overview"), 303)


# -- helpers ------------------------------------------------------------------------------


def common() -> dict[str, Any]:
    principal = caller().principal
    assert principal is not None  # signed_in ran
    return {
        "me": principal,
        "is_admin": principal.role is Role.ADMIN,
        "csrf": sess.csrf_token(),
        "now": dashboard().now(),
    }


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _form_int(name: str) -> int:
    raw = request.form.get(name, "").strip()
    if not raw.isdigit() or len(raw) > 9:
        raise InvalidRequest(f"{name} must be a whole number")
    return int(raw)

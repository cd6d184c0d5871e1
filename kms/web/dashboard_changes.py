"""The dashboard's dual-control pages, on the ``dashboard`` blueprint (kms/web/dashboard.py;
kms/app.py imports this module): the changes (pending first) with the control policy, one
change with its digest and the command a custodian signs it with, and the proposer's
Apply and an admin's Cancel. Also, for every dashboard page: the control mode (a banner
in single-operator mode), and the answer to any dashboard action that dual control
recorded as a pending change (kms.errors.ChangeProposed): "change proposed, awaiting
approvals" on that change's page, instead of an error page.

Applying calls the same service methods, with the same audit records, as
``POST /v1/changes/<id>/apply`` (kms/api/changes.py APPLY: one table from a change's kind
to its effect). A result that holds a secret (a new principal's token, a SigV4 secret) is
shown once, in the response to that POST (``Cache-Control: no-store``): never in a flash
message (those live in the session cookie) nor in a log, and the change's page does not
show it again.

Everything shown of a change comes from the admin who proposed it and is read by the
custodians and auditors who check it: it is rendered as text (Jinja autoescaping, never
``|safe``), strings with their non-printable characters escaped, and the parameters also
as the exact JSON the digest covers.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from flask import flash, g, redirect, render_template, url_for
from werkzeug.wrappers import Response

from kms.api.changes import APPLY
from kms.api.context import services
from kms.errors import ChangeProposed, InvalidRequest, KmsError
from kms.services.change_model import PENDING, Change, ControlPolicy
from kms.services.changes import ChangeView
from kms.web.dashboard import bp, caller, check_csrf, common, require_admin, signed_in

log = logging.getLogger("kms.dashboard")
CHANGE_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SECRET_FIELDS = ("token", "secret_access_key")  # what an applied change shows only once
PROPOSED = "Change proposed, awaiting approvals"
FLASH_CAP = 300  # characters of a change's summary in a flash message


@dataclass(frozen=True)
class ControlState:
    """The control policy as every page shows it (``policy`` None: it could not be read)."""

    policy: ControlPolicy | None
    error: str | None = None

    @property
    def single_operator(self) -> bool:
        return self.policy is not None and not self.policy.dual

    @property
    def ttl(self) -> timedelta:
        return timedelta(seconds=self.policy.ttl_seconds if self.policy else 0)


@bp.context_processor
def _control() -> dict[str, Any]:
    """The control policy for the banner of every dashboard page (read once a request).
    Never fails the page it decorates (an error page too): a failure to read it is shown
    and logged."""
    if "kms_control" not in g:
        try:
            g.kms_control = ControlState(services().changes.policy())
        except Exception as e:  # never fails the page (see docstring)
            code = e.code if isinstance(e, KmsError) else "internal_error"
            log.warning("control policy not read for the dashboard", extra={"code": code})
            g.kms_control = ControlState(None, code)
    return {"control": g.kms_control}


@bp.errorhandler(ChangeProposed)
def _proposed(err: ChangeProposed) -> Response:
    """A dashboard action recorded as a pending change: to the change's page (the message
    is not an error; the change is recorded and audited as ``propose_change``)."""
    change_id = str(err.change.get("change_id", ""))
    if not CHANGE_ID_RE.fullmatch(change_id):
        flash(f"{PROPOSED}.", "info")
        return redirect(url_for(".changes"), 303)
    flash(f"{PROPOSED}: {short(describe(_as_change(err.change)))}.", "info")
    return redirect(url_for(".change", change_id=change_id), 303)


# -- pages --------------------------------------------------------------------------------


@bp.get("/changes")
@signed_in
def changes() -> str:
    """Pending changes first (oldest expiry first), then the others, newest first."""
    service = services().changes
    pending = [v for v in service.list_changes(caller(), PENDING) if v.state == PENDING]
    pending.sort(key=lambda v: v.change.expires_at)
    others = [v for v in service.list_changes(caller()) if v.state != PENDING]
    return render_template(
        "dashboard/changes.html",
        pending=[_row(v) for v in pending],
        others=[_row(v) for v in others],
        **common(),
    )


@bp.get("/changes/<change_id>")
@signed_in
def change(change_id: str) -> str:
    view = services().changes.view(caller(), _checked_id(change_id))
    return render_template("dashboard/change.html", c=_row(view), **common())


# -- actions ------------------------------------------------------------------------------


@bp.post("/changes/<change_id>/apply")
@signed_in
def apply_change(change_id: str) -> Any:
    """The approved change takes effect, as its proposer's request. A result holding a
    secret is shown here, once; otherwise back to the change's page."""
    check_csrf("apply_change")
    require_admin("apply_change")
    found = services().changes.applicable(caller(), _checked_id(change_id))
    answer = APPLY[found.kind](replace(caller(), change=found.change_id), found.params)
    result = answer[0] if isinstance(answer, tuple) else answer
    back = url_for(".change", change_id=found.change_id)
    if not any(result.get(k) for k in SECRET_FIELDS):
        flash(f"Applied: {short(describe(found))}.", "info")
        return redirect(back, 303)
    return render_result(f"Applied: {describe(found)}", result, back, "Back to the change")


@bp.post("/changes/<change_id>/cancel")
@signed_in
def cancel_change(change_id: str) -> Response:
    check_csrf("cancel_change")
    require_admin("cancel_change")
    view = services().changes.cancel(caller(), _checked_id(change_id))
    flash(
        f"Cancelled the change: {short(describe(view.change))}. It can no longer be applied.",
        "info",
    )
    return redirect(url_for(".change", change_id=view.change.change_id), 303)


def render_result(title: str, result: dict[str, Any], back: str, back_label: str) -> str:
    """The page of an action's result (kms/web/templates/dashboard/result.html); its
    secret fields are shown once, apart, with a warning. Also used by the principals
    page's "create" action."""
    secrets = [(k, str(result[k])) for k in SECRET_FIELDS if result.get(k)]
    fields = [(k, value_text(v)) for k, v in result.items() if k not in SECRET_FIELDS]
    return render_template(
        "dashboard/result.html",
        title=title,
        fields=fields,
        secrets=secrets,
        back=back,
        back_label=back_label,
        **common(),
    )


# -- how a change reads -------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeRow:
    """A change as the pages show it: the service's view, a one-line summary, and each
    parameter both as text and as the exact JSON the digest covers."""

    view: ChangeView
    summary: str
    params: list[tuple[str, str]]
    params_json: str  # the canonical JSON of the params, as stored and signed

    @property
    def change(self) -> Change:
        return self.view.change


def _row(view: ChangeView) -> ChangeRow:
    c = view.change
    return ChangeRow(
        view,
        describe(c),
        [(name, value_text(value)) for name, value in sorted(c.params.items())],
        c.params_json,
    )


def text(value: Any) -> str:
    """A string from a change as plain printable text: every character outside printable
    ASCII is shown as its escape (\\u202e, \\n ...), so what a signer reads is what the
    digest covers (no bidi override, no invisible character, no line break)."""
    s = str(value)
    if s.isascii() and s.isprintable():
        return s
    return "".join(ch if ch.isascii() and ch.isprintable() else ascii(ch)[1:-1] for ch in s)


def short(summary: str, cap: int = FLASH_CAP) -> str:
    """``summary`` cut to ``cap`` characters: a flash message lives in the session cookie,
    which a browser drops (ending the session) past 4 kB."""
    return summary if len(summary) <= cap else summary[: cap - 1] + "…"


def value_text(value: Any) -> str:
    """A parameter's value as text: strings as themselves (see ``text``), lists joined,
    null as "null", anything else as its JSON."""
    if isinstance(value, str):
        return text(value)
    if value is None:
        return "null"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(text(v) for v in value) if value else "(none)"
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


def describe(c: Change) -> str:
    """One line saying what the change does, for the lists, the flash messages and the
    titles (the parameters are listed in full on the change's page)."""
    a = c.params

    def v(name: str) -> str:
        return value_text(a.get(name))

    match c.kind:
        case "create_principal":
            return f"create {v('role')} principal {v('name')}"
        case "grant":
            ops = v("operations")
            return f"grant {v('principal')} {ops} on key {v('key')}"
        case "issue_sigv4":
            return f"issue SigV4 credentials for {v('name')}"
        case "issue_token":
            if a.get("rotate") is not None:
                return f"rotate token {v('rotate')} of {v('name')}"
            return f"issue a token for {v('name')}"
        case "register_custodian":
            return f"register custodian {v('name')} in group {v('group')}"
        case "revoke_custodian":
            return f"revoke custodian {v('name')}"
        case "set_escrow_policy":
            return (
                f"set the escrow policy of key {v('key')}: quorum {v('quorum')}, "
                f"required groups {v('required_groups')}, veto groups {v('veto_groups')}"
            )
        case "set_xks_policy":
            return (
                f"set the XKS policy of key {v('key')}: usage {v('usage')}, "
                f"AWS principals {v('aws_principals')}, KMS operations {v('kms_operations')}"
            )
        case "schedule_deletion":
            return f"schedule the deletion of key {v('key')} in {v('pending_days')} days"
        case "set_control_policy":
            return (
                f"set the control policy: mode {v('mode')}, quorum {v('quorum')}, "
                f"required groups {v('required_groups')}, TTL {v('ttl_seconds')} s"
            )
    return f"{text(c.kind)} {value_text(a)}"


def _as_change(payload: dict[str, Any]) -> Change:
    """The Change of a change's public dict (kms.services.changes.payload), to describe."""
    params = payload.get("params")
    return Change(
        str(payload.get("change_id", "")),
        str(payload.get("kind", "")),
        json.dumps(params if isinstance(params, dict) else {}, sort_keys=True),
        str(payload.get("proposer", "")),
        str(payload.get("created_at", "")),
        str(payload.get("expires_at", "")),
        str(payload.get("digest", "")),
        str(payload.get("state", "")),
    )


def _checked_id(change_id: str) -> str:
    if not CHANGE_ID_RE.fullmatch(change_id):
        raise InvalidRequest("change id must be a UUID")
    return change_id

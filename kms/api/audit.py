"""The auditor API (roles admin and auditor) and health probes."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from kms.api import parsing as p
from kms.api.context import caller, operation, services
from kms.errors import InvalidRequest
from kms.services.audit_export import parse_time, report_csv
from kms.services.model import AuditQuery

bp = Blueprint("audit", __name__)

_FILTERS = ("key_id", "principal", "operation", "outcome", "case_id")


def _query() -> AuditQuery:
    values = {}
    for name in _FILTERS:
        value = request.args.get(name)
        if value is not None and (not value or len(value) > 64):
            raise InvalidRequest(f"{name} must be 1..64 characters")
        values[name] = value
    times = {n: parse_time(v, n) for n in ("since", "until") if (v := request.args.get(n))}
    return AuditQuery(**values, **times)


@bp.get("/v1/audit")
@operation("read_audit")
def audit() -> dict[str, Any]:
    """``?after=<seq>&limit=<n>`` (defaults 0 and 100, limit at most 1000) and optional
    filters ``key_id, principal, operation, outcome, case_id, since, until`` (ISO 8601
    times, ``until`` exclusive) -> ``{"records": [...]}`` in chain order."""
    records = services().audit.records(
        caller(), p.query_int("after", 0), p.query_int("limit", 100), _query()
    )
    return {"records": records}


@bp.get("/v1/audit/checkpoints")
@operation("read_checkpoints")
def checkpoints() -> dict[str, Any]:
    """``?after=<seq>&limit=<n>`` -> ``{"checkpoints": [...]}`` (kms/formats/checkpoint.py)."""
    found = services().audit.checkpoints(
        caller(), p.query_int("after", 0), p.query_int("limit", 100)
    )
    return {"checkpoints": found}


@bp.post("/v1/audit/checkpoints")
@operation("create_checkpoint")
def create_checkpoint() -> tuple[dict[str, Any], int]:
    """Sign a checkpoint of the current head now (admin) -> 201 the checkpoint."""
    p.json_body(set())
    return services().audit.checkpoint(caller()) or {}, 201


@bp.get("/v1/audit/public-key")
@operation("read_audit_public_key")
def public_key() -> Response:
    """The audit signing key, PEM (SubjectPublicKeyInfo)."""
    pem = services().audit.read_public_key(caller())
    return Response(pem, mimetype="application/x-pem-file")


@bp.get("/v1/audit/export")
@operation("export_audit")
def export() -> Response:
    """``?after=<seq>&until=<seq>`` (both optional) -> the bundle as JSON Lines
    (``application/x-ndjson``, layout in kms/formats/bundle.py)."""
    after = p.query_int("after", -1)
    until = p.query_int("until", -1)
    lines = services().exports.export(
        caller(), None if after < 0 else after, None if until < 0 else until
    )
    return Response(lines, mimetype="application/x-ndjson")


@bp.get("/v1/audit/report")
@operation("audit_report")
def report() -> Any:
    """``?since=<ISO time>&until=<ISO time>&format=json|csv`` -> per key and per principal:
    operations by type, failures, unwraps by justification, escrow unwraps."""
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest("format must be json or csv")
    since, until = request.args.get("since"), request.args.get("until")
    if not since or not until:
        raise InvalidRequest("since and until are required")
    result = services().exports.report(
        caller(), parse_time(since, "since"), parse_time(until, "until")
    )
    if fmt == "csv":
        return Response(report_csv(result), mimetype="text/csv")
    return result


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, Any], int]:
    """``{"status": "ok"|"unavailable", "checks": {"hsm", "database", "audit_signing_key"}}``
    with each check "ok" or an error code: 200 when every check is ok, 503 otherwise.
    Unauthenticated (load balancers probe it); it shows only those codes, no detail."""
    checks = services().health.readiness()
    ok = all(v == "ok" for v in checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503

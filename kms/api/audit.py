"""The auditor API (roles admin and auditor) and health probes."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from kms.api import parsing as p
from kms.api.context import caller, operation, services
from kms.errors import InvalidRequest, KmsError
from kms.services.audit_export import parse_time, report_csv
from kms.services.model import AuditQuery

bp = Blueprint("audit", __name__)

_FILTERS = ("key_id", "principal", "operation", "outcome", "case_id")


def _query() -> AuditQuery:
    values: dict[str, str | None] = {}
    for name in _FILTERS:
        value = request.args.get(name)
        if value is not None and (not value or len(value) > 64):
            raise InvalidRequest(f"{name} must be 1..64 characters")
        values[name] = value
    times = {n: parse_time(v, n) for n in ("since", "until") if (v := request.args.get(n))}
    return _make_query(values, times)


def _make_query(values: dict[str, str | None], times: dict[str, str]) -> AuditQuery:
    return AuditQuery(
        key_id=values["key_id"],
        principal=values["principal"],
        operation=values["operation"],
        outcome=values["outcome"],
        case_id=values["case_id"],
        since=times.get("since"),
        until=times.get("until"),
    )


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


_BY_CONTEXT = {"context", "after", "limit", *_FILTERS, "since", "until"}
_MAX_SEQ = 999_999_999_999_999_999


@bp.post("/v1/audit/context")
@operation("read_audit_context")
def audit_by_context() -> dict[str, Any]:
    """``{context, after?=0, limit?=100, key_id?, principal?, operation?, outcome?,
    case_id?, since?, until?}`` -> ``{"records": [...]}``: the records of that encryption
    context, in chain order. The server computes the context's keyed hash; the query is
    recorded with that hash, never the context. A POST so that the context stays out of
    URLs and access logs."""
    body = p.json_body(_BY_CONTEXT, frozenset({"context"}))
    if body["context"] is None:
        raise InvalidRequest("context must be an object of string values")
    context = p.context(body)
    after = p.integer(body, "after", (0, _MAX_SEQ)) if "after" in body else 0
    limit = p.integer(body, "limit", (1, 1000)) if "limit" in body else 100
    for name in (*_FILTERS, "since", "until"):
        if name in body and not isinstance(body[name], str):  # null too: absent means any
            raise InvalidRequest(f"{name} must be a string")
    values: dict[str, str | None] = {}
    for name in _FILTERS:
        value = p.string(body, name, max_len=64)
        if value == "":
            raise InvalidRequest(f"{name} must be 1..64 characters")
        values[name] = value
    times = {
        n: parse_time(v, n) for n in ("since", "until") if (v := p.string(body, n, max_len=64))
    }
    query = _make_query(values, times)
    records = services().audit_context.records(caller(), context, after, limit, query)
    return {"records": records}


@bp.get("/v1/audit/checkpoints")
@operation("read_checkpoints")
def checkpoints() -> dict[str, Any]:
    """``?after=<seq>&limit=<n>`` -> ``{"checkpoints": [...]}`` (kms/formats/checkpoint.py),
    oldest first: the checkpoint feed, for admins and auditors. The data owner pulls it with
    an auditor token to witness every checkpoint (docs/auditing.md)."""
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
    """``{"status": "ok"|"unavailable", "checks": {"hsm", "database", "audit_signing_key",
    "audit_anchor"}}``
    with each check "ok" or an error code: 200 when every check is ok, 503 otherwise; and
    ``"control"``: "dual" or "single-operator" (kms/services/changes.py).
    Unauthenticated (load balancers probe it); it shows only those codes, no detail."""
    checks = services().health.readiness()
    ok = all(v == "ok" for v in checks.values())
    try:
        control = services().changes.policy().mode
    except KmsError as e:
        control = e.code
    body = {"status": "ok" if ok else "unavailable", "checks": checks, "control": control}
    return body, 200 if ok else 503

"""Audit trail reads and health probes."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from kms.api import parsing as p
from kms.api.context import caller, operation, services

bp = Blueprint("audit", __name__)


@bp.get("/v1/audit")
@operation("read_audit")
def audit() -> dict[str, Any]:
    """``?after=<seq>&limit=<n>`` (defaults 0 and 100, limit at most 1000) ->
    ``{"records": [...]}`` in chain order, each with its ``seq`` and hashes."""
    records = services().audit.records(caller(), p.query_int("after", 0), p.query_int("limit", 100))
    return {"records": records}


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, Any], int]:
    """200 when the HSM and the database answer, 503 otherwise, with each check's result."""
    checks = services().health.readiness()
    ok = all(v == "ok" for v in checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503

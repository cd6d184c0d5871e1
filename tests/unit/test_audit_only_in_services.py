"""Auditing is the service layer's job alone: no module of the HTTP faces (kms/api,
kms/web) writes an audit record or says whether one was written. They may only enter the
service layer's audited scope (AuditTrail.operation) and call service methods."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "kms"
# AuditTrail methods that write records, called on the trail under any of its names.
WRITERS = {"record", "append", "append_drafts", "_record_failure", "refused", "fail_as"}
TRAILS = {"audit", "_audit", "trail", "_trail"}


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def _calls(path: Path) -> list[str]:
    """Writes to the audit trail, and any use of an "audited" flag, in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        if (node.attr in WRITERS and _name(node.value) in TRAILS) or node.attr == "audited":
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} .{node.attr}")
    return found


def test_no_http_module_writes_audit_records() -> None:
    modules = sorted([*ROOT.joinpath("api").rglob("*.py"), *ROOT.joinpath("web").rglob("*.py")])
    assert modules
    assert [c for m in modules for c in _calls(m)] == []


def test_the_check_sees_a_writer() -> None:
    """The check is not blind: the service layer's own writers are found."""
    assert any(".append" in c for c in _calls(ROOT / "services" / "keys.py"))

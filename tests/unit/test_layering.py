"""The import rules of the layers (docs/design.md, "Layers"), checked on the source: HTTP
never touches pkcs11, SQL or Redis; services and formats never import flask; only backends
import drivers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = {"pkcs11", "sqlalchemy", "alembic", "redis"}

# package prefix -> imports it must not make (top-level names or kms sub-packages)
RULES: dict[str, set[str]] = {
    "kms/api": DRIVERS | {"kms.backends", "kms.bootstrap"},
    "kms/web": DRIVERS | {"kms.backends", "kms.bootstrap"},
    "kms/services": DRIVERS | {"flask", "werkzeug", "kms.api", "kms.backends", "kms.app"},
    "kms/formats": DRIVERS | {"flask", "werkzeug", "kms.api", "kms.backends", "kms.services"},
    "kms/cli": DRIVERS | {"kms.backends", "flask"},
    "kms/client": DRIVERS | {"flask", "kms.api", "kms.backends", "kms.services", "kms.app"},
    "kms/backends/hsm": {"sqlalchemy", "alembic", "redis", "flask", "kms.api"},
    "kms/backends/storage": {"pkcs11", "redis", "flask", "kms.api"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(prefix: str, forbidden: set[str]) -> list[str]:
    found = []
    for path in sorted((ROOT / prefix).rglob("*.py")):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("prefix", sorted(RULES))
def test_layer_imports(prefix: str) -> None:
    assert (ROOT / prefix).is_dir()
    assert _violations(prefix, RULES[prefix]) == []


def test_rule_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import pkcs11\nfrom flask import g\nfrom kms.backends.hsm import x\n")
    assert imports_of(bad) == {"pkcs11", "flask", "kms.backends.hsm"}


def test_pkcs11_only_in_hsm_backend_and_hsm_config() -> None:
    allowed = ("kms/backends/hsm/", "hsm_config/")
    for path in sorted(ROOT.glob("kms/**/*.py")):
        rel = str(path.relative_to(ROOT))
        if "pkcs11" in {n.split(".")[0] for n in imports_of(path)}:
            assert rel.startswith(allowed), rel

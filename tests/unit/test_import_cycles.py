"""No import cycle between the modules of ``kms/``, checked on the source with ``ast``.

The graph has an edge A -> B when loading A runs ``import B`` (or ``from B import ...``,
or ``from pkg import B`` for a submodule B) at import time: in A's top level, class
bodies, ``try`` and ordinary ``if`` blocks. Two kinds of import are left out:

- imports inside ``if TYPE_CHECKING:`` never run;
- imports inside functions run when the function is called, after every module has
  finished loading, so they cannot meet a half-initialised module. They are the usual way
  to defer a heavy or optional dependency, and their direction is checked by
  test_layering.py, which sees every import statement.

Importing ``a.b.c`` also runs the ``__init__`` of the packages ``a`` and ``a.b``, so the
edge goes to them too, except to the packages that contain the importing module: those
are already loaded (or loading) before it runs, whatever they import. ``from pkg import
name`` counts as importing the submodule ``pkg.name`` whenever one exists (it may only be
an attribute of ``pkg``: a cycle found that way is at worst a near miss).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "kms"

# Cycles known to exist, each to be removed (none today). An entry is the sorted modules of
# one strongly connected component, as cycles() returns it; the test fails when a listed
# cycle is gone, so that the list only shrinks.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``root``, by dotted name."""
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run when the module is loaded (not in functions, not under
    ``if TYPE_CHECKING:``)."""
    for node in body:
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _load_time_statements(node.orelse)
            continue
        for name in ("body", "orelse", "finalbody"):
            yield from _load_time_statements(getattr(node, name, []))
        for handler in getattr(node, "handlers", []):
            yield from _load_time_statements(handler.body)
        for case in getattr(node, "cases", []):
            yield from _load_time_statements(case.body)


def _imported(node: ast.stmt, name: str, is_package: bool) -> Iterator[str]:
    """Dotted names a statement of module ``name`` imports (submodules included)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = name.split(".")
            anchor = parts if is_package else parts[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports at load time."""
    found = modules(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        is_package = path.name == "__init__.py"
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        if not is_package:
            own.discard(name)
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in _load_time_statements(tree.body):
            for target in _imported(node, name, is_package):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in found and prefix not in own:
                        edges.add(prefix)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Each strongly connected component of more than one module: the modules of one or
    more cycles, as a sorted tuple."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few hundred nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return {tuple(sorted(c)) for c in components}


def describe(graph: dict[str, set[str]], component: tuple[str, ...]) -> str:
    """A readable path ``a -> b -> ... -> a`` inside one strongly connected component."""
    members = set(component)
    start = component[0]
    # breadth-first search for the shortest way back to start within the component
    paths = {w: [start, w] for w in sorted(graph[start] & members)}
    frontier = list(paths)
    while start not in paths and frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return " -> ".join(paths.get(start, list(component)))


def test_kms_has_no_import_cycle_beyond_the_known_ones() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 50  # the scan found the package
    found = cycles(graph)
    new = [describe(graph, c) for c in sorted(found - KNOWN_CYCLES)]
    assert new == [], "import cycles:\n" + "\n".join(new)
    gone = sorted(KNOWN_CYCLES - found)
    assert gone == [], f"cycles fixed: remove them from KNOWN_CYCLES: {gone}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_cycle_and_ignores_deferred_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import x\n",
            "pkg/b.py": "from pkg import c\n",
            "pkg/c.py": "import pkg.a\n",
            "pkg/d.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from pkg.e import y\n"
                "def f():\n    from pkg.e import y\n"
            ),
            "pkg/e.py": "from . import d\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.d"] == set()
    assert graph["pkg.e"] == {"pkg.d"}
    assert cycles(graph) == {("pkg.a", "pkg.b", "pkg.c")}
    assert describe(graph, ("pkg.a", "pkg.b", "pkg.c")) == "pkg.a -> pkg.b -> pkg.c -> pkg.a"


def test_checker_follows_package_inits_but_not_the_importers_own(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # a package importing its own submodule, which imports a sibling: no cycle
            "pkg/sub/__init__.py": "from pkg.sub.one import x\n",
            "pkg/sub/one.py": "from pkg.sub.two import y\n",
            "pkg/sub/two.py": "",
            # importing pkg.other.mod runs pkg/other/__init__.py, which imports back
            "pkg/other/__init__.py": "from pkg.sub.two import y\nfrom pkg import top\n",
            "pkg/other/mod.py": "",
            "pkg/top.py": "from pkg.other.mod import z\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.one"] == {"pkg.sub.two"}
    assert graph["pkg.top"] == {"pkg.other", "pkg.other.mod"}
    assert cycles(graph) == {("pkg.other", "pkg.top")}

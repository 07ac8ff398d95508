"""The import graph of toa's own code, read from the source (ast), every import counted, also
those inside functions: no cycle; no module imports another's private names; the algorithms
(methods/) load no Prefect, HTTP, SQL or fsspec code, even through what they import; flows/ make
no HTTP call of their own and hold no SQL (SQL lives in sql/, tests/test_sql_readonly.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"toa": REPO / "src" / "toa", "toa.flows": REPO / "flows", "toa.tasks": REPO / "tasks",
            "toa.blocks": REPO / "blocks", "toa.sql": REPO / "sql"}
FORBIDDEN_IN_METHODS = ("prefect", "openai", "duckdb", "fsspec", "httpx")


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()
# Parsed once, at collection, before any test leaves a thread behind: on CPython 3.11 an
# ast.parse while another thread compiles a module (a lazy import in a leftover engine or
# Prefect thread) can fail with "SystemError: AST constructor recursion depth mismatch".
TREES = {path: ast.parse(path.read_text()) for path in MODULES.values()}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(TREES[path]):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base) if node.level else node.module
            found.append((module, [a.name for a in node.names]))
    return found


def _own(module: str, names: list[str]) -> set[str]:
    """The toa modules an import statement loads: the module itself, or submodules named in it."""
    subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    return subs | ({module} if module in MODULES and (not subs or len(subs) < len(names)) else set())


GRAPH = {name: set().union(*[_own(m, ns) for m, ns in _imports(name, path)] or [set()]) - {name}
         for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                out.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles() == []


def test_the_cycle_check_sees_a_cycle():
    GRAPH["toa.rows"].add("toa.config")  # config -> methods -> ... -> rows, and back
    try:
        assert _cycles()
    finally:
        GRAPH["toa.rows"].discard("toa.config")


def test_no_module_imports_another_modules_private_names():
    private = [f"{name}: from {module} import {n}" for name, path in MODULES.items()
               for module, names in _imports(name, path) if module in MODULES for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert private == []


def _private_attribute_uses(name: str, path: Path) -> list[str]:
    """`alias._name` where alias is another toa module imported into this one."""
    tree = TREES[path]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name: a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                        if f"{node.module}.{a.name}" in MODULES}
    return [f"{name}: {aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__") and aliases[n.value.id] != name]


def test_no_module_uses_another_modules_private_attributes():
    assert [use for name, path in MODULES.items() for use in _private_attribute_uses(name, path)] == []


def _loaded_by(start: str) -> set[str]:
    """Every module importing `start` loads, parent packages included (Python runs their
    __init__ first), third-party ones by their top-level name."""
    seen, todo, third_party = set(), [start], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [p for p in parents if p in MODULES]
        for module, names in _imports(name, MODULES[name]):
            own = _own(module, names)
            todo += own
            if not own and not module.startswith("toa"):
                third_party.add(module.split(".")[0])
    return seen | third_party


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("toa.methods")))
def test_methods_load_no_prefect_http_sql_or_fsspec(module):
    assert set(FORBIDDEN_IN_METHODS) & _loaded_by(module) == set()


def test_flows_make_no_http_call_of_their_own():
    for name in (m for m in MODULES if m.startswith("toa.flows")):
        direct = {module.split(".")[0] for module, _ in _imports(name, MODULES[name])}
        assert not direct & {"httpx", "openai", "requests", "urllib", "duckdb", "fsspec"}, name

"""The service's structure: which package may import which, no import cycle, short functions.

Read from the source with `ast` (nothing is imported), counting imports inside functions too:

    core <- persistence <- api, worker <- cli        (migrations: Alembic's env.py reads persistence)

The API and the worker meet only in persistence (the tables, the job state, the queue); the
CLI composes them (`svdforge serve`, `svdforge.cli.embedded`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "persistence", "api", "worker", "cli", "migrations")  # folder = svdforge.<folder>
MAY_IMPORT = {
    "core": set(),
    "persistence": {"core"},
    "api": {"core", "persistence"},
    "worker": {"core", "persistence"},
    "cli": {"core", "persistence", "api", "worker"},
    "migrations": {"persistence"},
}
SERVICE = ("persistence", "api", "worker", "cli", "migrations")  # core's own layout is core's business
MAX_FUNCTION_LINES = 60
# cli/core_cmds.py holds the library's commands and is reworked with core; split it there.
LONG_FUNCTIONS_ELSEWHERE = {"cli/core_cmds.py:compress"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = ["svdforge", package, *path.relative_to(ROOT / package).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The svdforge modules `name` imports (a `from package import module` names the module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, *([node.module] if node.module else [])])
            named.add(base)
            named.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    out = set()
    for target in named:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target.startswith("svdforge.") and target != name:
            out.add(target)
    return out


EDGES = {name: _imports(name, path) for name, path in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[1]


def test_packages_import_only_the_layers_below():
    wrong = sorted(f"{m} imports {t}" for m, targets in EDGES.items() for t in targets
                   if _package(t) != _package(m) and _package(t) not in MAY_IMPORT[_package(m)])
    assert not wrong


def test_no_import_cycle_between_service_modules():
    graph = {m: {t for t in ts if _package(t) in SERVICE} for m, ts in EDGES.items() if _package(m) in SERVICE}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


@pytest.mark.parametrize("package", ["persistence", "api", "worker", "cli"])
def test_functions_are_short(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(ROOT)}:{node.name}"
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and where not in LONG_FUNCTIONS_ELSEWHERE:
                    long.append(f"{where} ({lines} lines)")
    assert not long


def test_the_checks_see_the_edges_they_forbid():
    """The walk finds what it must: the API's use of the queue, the CLI's of the API."""
    assert "svdforge.persistence.queue" in EDGES["svdforge.api.routes.jobs"]
    assert "svdforge.api.main" in EDGES["svdforge.cli.embedded"]  # inside `serve`
    assert "svdforge.persistence.tables" in EDGES["svdforge.migrations.env"]

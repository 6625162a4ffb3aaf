"""The house rules that keep the tree navigable: one import root, no import cycles, layered packages.

- The wheel installs one top-level package, `svdforge` (plus its dist-info).
- Importing the API, the worker and the CLI loads no bare `core`, `api`, `worker`, ... module,
  even from the repository root, where those folders are importable by their bare names.
- The import graph built from the source (every `import`, function-level ones included) has
  no cycle between modules, and the packages import one another only downwards:
  core <- persistence <- api, worker <- cli (migrations: persistence).
- No function over 60 lines in the library or the service.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "api", "worker", "persistence", "cli", "migrations")
BARE = FOLDERS
# package -> the packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "persistence": {"core"},
    "api": {"core", "persistence"},
    "worker": {"core", "persistence"},
    "cli": {"core", "persistence", "api", "worker"},
    "migrations": {"persistence"},
}
MAX_FUNCTION_LINES = 60


def module_files(root: Path = ROOT, prefix: str = "svdforge.") -> dict[str, Path]:
    """Module name -> source file, for every module of the installed package."""
    out = {}
    for folder in FOLDERS:
        for p in sorted((root / folder).rglob("*.py")):
            rel = p.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[prefix + ".".join(parts)] = p
    return out


def import_graph(modules: dict[str, Path], prefix: str = "svdforge.") -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports anywhere in its source."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith(prefix):
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str, prefix: str = "svdforge.") -> str:
    return module[len(prefix):].split(".")[0]


def test_no_import_cycle_between_modules():
    found = cycles(import_graph(module_files()))
    assert not found, f"import cycles: {found}"


def test_packages_import_only_downwards():
    bad = sorted({f"{_package(a)} -> {_package(b)} ({a} imports {b})"
                  for a, edges in import_graph(module_files()).items() for b in edges
                  if _package(b) != _package(a) and _package(b) not in ALLOWED[_package(a)]})
    assert not bad, "\n".join(bad)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_over_60_lines():
    long = []
    for folder in ("core", "api", "worker", "persistence"):
        for p in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_the_service_loads_no_bare_top_level_module():
    """From the repository root, where `core/`, `api/`, ... are importable by their bare names."""
    code = ("import sys; import svdforge.api.main, svdforge.worker.tasks, svdforge.cli.main, "
            "svdforge.cli.embedded, svdforge.core.pipeline, svdforge.persistence.migrate; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BARE!r}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (setuptools leaves build/ where it builds)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("svdforge", *FOLDERS):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (whl,) = out.glob("svdforge-*.whl")
    return whl


def test_the_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"svdforge"}, sorted(tops)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["svdforge"]
    for path in ("svdforge/__init__.py", "svdforge/core/layer_loop.py", "svdforge/core/methods/base.py",
                 "svdforge/api/main.py", "svdforge/worker/tasks.py", "svdforge/cli/main.py",
                 "svdforge/persistence/queue.py", "svdforge/migrations/env.py",
                 "svdforge/migrations/script.py.mako", "svdforge/migrations/versions/0001_initial.py"):
        assert path in names, path


def test_a_plain_install_runs_from_another_folder(wheel, tmp_path):
    """`pip install` of the wheel (not editable): the CLI and the migrations work from elsewhere."""
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, svdforge.cli.main as m, svdforge.persistence.migrate as mig; "
            "assert m.__file__.startswith(sys.argv[1]), m.__file__; "
            "assert (mig.scripts_dir() / 'env.py').is_file(); print('ok')")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code, str(site)], cwd=elsewhere, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    help_ = subprocess.run([sys.executable, "-m", "svdforge.cli.main", "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "compress" in help_.stdout and "serve" in help_.stdout, help_.stderr

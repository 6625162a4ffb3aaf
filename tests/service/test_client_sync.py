"""The generated OpenAPI client (clients/python) can never drift from the API.

* regenerating it from the live app gives exactly the committed files (and openapi.json);
* the `(method, path) -> operationId` map of the live schema equals the committed snapshot
  (clients/operations.json), so a renamed operationId (a renamed client function) is a
  deliberate change, made by regenerating with `clients/generate.py --operations`;
* the client installs with pip and imports.
"""
from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients"
sys.path.insert(0, str(CLIENTS))
import generate  # noqa: E402 - clients/generate.py

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
needs_generator = pytest.mark.skipif(
    not GENERATOR.exists() and shutil.which("openapi-python-client") is None,
    reason="openapi-python-client is not installed (it comes with the `test` extra: pip install -e '.[test]')")
IGNORED = {"__pycache__", ".ruff_cache", ".pytest_cache"}


def _tree(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not IGNORED & set(p.relative_to(root).parts)}


def test_operation_ids_match_the_snapshot():
    snapshot = json.loads((CLIENTS / "operations.json").read_text())
    live = generate.operation_map(generate.openapi_schema())
    assert live == snapshot, ("the API's operationIds changed; if that is deliberate, run "
                              "`python clients/generate.py --operations` and commit clients/")
    assert len(set(live.values())) == len(live)  # one function per operation in the client


def test_committed_schema_is_the_live_schema():
    committed = (CLIENTS / "openapi.json").read_text(encoding="utf-8")
    assert committed == generate.dump(generate.openapi_schema()), \
        "clients/openapi.json is stale: run `python clients/generate.py` and commit clients/"


@needs_generator
def test_committed_client_equals_a_fresh_generation(tmp_path):
    fresh = generate.generate(tmp_path)
    committed, regenerated = _tree(CLIENTS / "python"), _tree(fresh)
    assert sorted(committed) == sorted(regenerated), "files differ: run `python clients/generate.py`"
    differing = [name for name in committed if not filecmp.cmp(committed[name], regenerated[name], shallow=False)]
    assert not differing, f"stale generated client files {differing}: run `python clients/generate.py`"
    for name, op in json.loads((CLIENTS / "operations.json").read_text()).items():
        tag = "health" if " /v1/" not in name else name.split("/")[2]
        assert (CLIENTS / "python" / "svdforge_client" / "api" / tag / f"{op}.py").is_file(), name


def test_client_installs_with_pip_and_imports(tmp_path):
    target = tmp_path / "site"
    build = tmp_path / "src"  # build from a copy: pip must not leave build/ or *.egg-info in the repo
    shutil.copytree(CLIENTS / "python", build, ignore=shutil.ignore_patterns(*IGNORED))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(build)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); import svdforge_client;"
            "import svdforge_client.api.jobs.create_job as c, svdforge_client.models as m;"
            f"assert svdforge_client.__file__.startswith({str(target)!r});"
            "print(c.sync.__name__, m.JobCreate.__name__)")
    run = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["sync", "JobCreate"]

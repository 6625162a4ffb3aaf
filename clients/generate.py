"""Regenerate the OpenAPI document and the Python client from the app itself (no server).

    .venv/bin/python clients/generate.py            # writes clients/openapi.json and clients/python/
    .venv/bin/python clients/generate.py --out DIR  # writes DIR/openapi.json and DIR/python/ (the sync test)

The schema comes from `svdforge.api.main.create_app(settings).openapi()` with throw-away settings
in a temporary folder, so nothing on this machine (a data folder, a database, a broker)
is touched or needed. openapi-python-client (pinned in the `test` extra, with the ruff it
formats with) turns it into `clients/python/`, a setuptools project named
`svdforge-client` holding the package `svdforge_client`. The same versions give the same
bytes, which `tests/service/test_client_sync.py` checks against the committed copy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = HERE / "generator.yaml"
OPERATIONS = HERE / "operations.json"


def openapi_schema() -> dict:
    """The app's OpenAPI document, built in-process around a scratch data folder."""
    from svdforge.api.main import create_app
    from svdforge.persistence.settings import Settings

    with tempfile.TemporaryDirectory(prefix="svdforge-schema-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", database_url="", broker_url="filesystem://",
                            storage="local", storage_dir=None)
        app = create_app(settings)
        schema = app.openapi()
        app.state.db.dispose()
    return schema


def operation_map(schema: dict) -> dict[str, str]:
    """`"METHOD /path" -> operationId`, sorted: the snapshot pinned by operations.json."""
    ops = {f"{method.upper()} {path}": op["operationId"]
           for path, methods in schema["paths"].items() for method, op in methods.items()}
    return dict(sorted(ops.items()))


def dump(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def generator_command() -> list[str]:
    exe = Path(sys.executable).with_name("openapi-python-client")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("openapi-python-client")
    if found:
        return [found]
    raise SystemExit("openapi-python-client is not installed: pip install 'svdforge[test]'")


def generate(out: Path) -> Path:
    """Write OUT/openapi.json and OUT/python/ (replaced whole); return the client folder."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "openapi.json"
    spec.write_text(dump(openapi_schema()), encoding="utf-8")
    target = out / "python"
    if target.exists():
        shutil.rmtree(target)
    # the generator's post-hooks call `ruff`: the one installed next to this interpreter
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [*generator_command(), "generate", "--path", str(spec), "--output-path", str(target),
           "--meta", "setup", "--config", str(CONFIG), "--overwrite", "--fail-on-warning"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"openapi-python-client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="folder for openapi.json and python/")
    parser.add_argument("--operations", action="store_true",
                        help="also rewrite clients/operations.json (the operationId snapshot) from the live schema")
    args = parser.parse_args(argv)
    target = generate(args.out)
    if args.operations:
        ops = operation_map(json.loads((args.out / "openapi.json").read_text()))
        OPERATIONS.write_text(json.dumps(ops, indent=2) + "\n")
    print(f"wrote {args.out / 'openapi.json'} and {target}")


if __name__ == "__main__":
    main()

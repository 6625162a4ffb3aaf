"""docker/: everything that can be checked without a Docker engine.

- docker/compose.yaml, after interpolation with docker/.env.example as compose does it,
  validates against the compose-spec JSON schema (the copy shipped in the docker-compose
  1.29.2 package, which `make install` installs with --no-deps for that file alone);
- semantics the schema cannot see: dependencies name services and wait for the right
  condition, long-running services have healthchecks, the worker reserves a GPU, every
  SVDFORGE_* variable is a setting, volumes are declared, secrets have no defaults;
- the Dockerfiles: non-root, exec-form CMD, pinned bases, COPY sources not excluded by
  .dockerignore, torch's CPU/CUDA build chosen as the README says;
- the commands the images and compose run (CMD, command, healthchecks) exist, and run:
  `svdforge migrate`, the API's uvicorn command, its healthcheck, `svdforge worker` and
  its healthcheck `svdforge check`, here on SQLite, a local folder and the filesystem queue.

Not checked here (no engine): image builds, base image tags, package downloads inside the
build, the GPU reservation, MinIO's `mc` and the other images' healthcheck commands.
"""
from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from svdforge.persistence.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
OUR_IMAGES = {"svdforge-api:local", "svdforge-worker:local"}
SERVICES = {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker"}
# SVDFORGE_* variables read by the core library (os.environ), not by Settings
CORE_ENV = {"SVDFORGE_CACHE", "SVDFORGE_TMP", "SVDFORGE_STATS_CACHE_MAX_BYTES"}
OTHER_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_HUB_OFFLINE"}
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


# --- helpers -------------------------------------------------------------------------
def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution in the parsed file's strings (so "false" stays a string):
    $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return VAR.sub(sub, value)


def variables(text: str) -> dict[str, str | None]:
    """{name: operator} of every variable the text uses ($$ escapes excluded)."""
    return {m.group(1) or m.group(4): m.group(2) for m in VAR.finditer(text) if m.group(0) != "$$"}


def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def compose_schema() -> dict:
    spec = importlib.util.find_spec("compose")  # located, not imported (its dependencies are not installed)
    path = Path(list(spec.submodule_search_locations)[0]) / "config" / "compose_spec.json" if spec else None
    if path is None or not path.is_file():
        pytest.fail("the compose-spec schema comes from `pip install --no-deps docker-compose==1.29.2` (make install)")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def raw() -> str:
    return (DOCKER / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate(yaml.safe_load(raw), env_example())


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (DOCKER / name).read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (instr, _) in enumerate(instructions) if instr == "FROM"]
    return instructions[starts[-1]:]


def image_cmd(name: str) -> list[str]:
    (cmd,) = [json.loads(a) for i, a in final_stage(dockerfile(name)) if i == "CMD"]
    return cmd


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    # Docker matches a pattern against paths from the context root; `**/` matches any folder depth.
    return any(fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(part, pat[3:]))
               for pat in patterns for prefix, part in zip(prefixes, parts))


@pytest.fixture(scope="module")
def image_site(tmp_path_factory) -> Path:
    """The package as the images install it: `pip install /src` (not editable) from a build context
    that holds only what .dockerignore lets through."""
    base = tmp_path_factory.mktemp("image")
    src = base / "src"
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not dockerignored((rel / d).as_posix())]
        for f in files:
            if not dockerignored((rel / f).as_posix()):
                (src / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / f, src / rel / f)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--target", str(base / "site"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return base / "site"


# --- compose: schema and semantics -----------------------------------------------------
def test_compose_file_matches_the_compose_spec_schema(raw, compose):
    import jsonschema_rs

    validator = jsonschema_rs.validator_for(compose_schema())
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    assert validator.is_valid(yaml.safe_load(raw))  # before interpolation too
    typo = copy.deepcopy(compose)
    typo["services"]["api"]["helthcheck"] = typo["services"]["api"].pop("healthcheck")
    assert not validator.is_valid(typo)  # the schema is strict enough to catch a misspelt key
    bad = copy.deepcopy(compose)
    bad["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_finished"
    assert not validator.is_valid(bad)


def test_variables_are_documented_and_secrets_have_no_default(raw):
    used, documented = variables(raw), env_example()
    assert set(used) <= set(documented), set(used) - set(documented)
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert used[secret] == ":?", f"{secret} must be required (${{{secret}:?...}}), never defaulted"
        env = {k: v for k, v in documented.items() if k != secret}
        with pytest.raises(KeyError, match=secret):
            interpolate(yaml.safe_load(raw), env)


def test_docker_compose_config_accepts_the_file(tmp_path):
    """Where a compose binary is installed (no engine needed for `config`), it parses, interpolates
    and validates the file the way `up` would."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            break
    else:
        pytest.skip("no docker compose / docker-compose here")
    (tmp_path / "empty.env").write_text("")  # not a docker/.env someone left there
    args = [*cmd, "--env-file", str(tmp_path / "empty.env"), "-f", str(DOCKER / "compose.yaml"), "-p", "svdforge",
            "config", "-q"]
    env = {**os.environ, **env_example()}
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    env.pop("POSTGRES_PASSWORD")
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode != 0 and "POSTGRES_PASSWORD" in p.stderr


def test_services_and_start_order(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"migrate", "minio-init"}
    for name, s in services.items():
        for dep, cond in (s.get("depends_on") or {}).items():
            assert dep in services and dep != name, (name, dep)
            expected = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert cond == {"condition": expected}, (name, dep, cond)
    for name in ("api", "worker"):  # migrations and the bucket come first
        deps = services[name]["depends_on"]
        assert {"migrate", "minio-init", "redis"} <= set(deps)
    assert services["migrate"]["command"] == ["svdforge", "migrate"]
    assert set(services["migrate"]["depends_on"]) == {"postgres"}
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:  # no cycles
        assert name not in path, path + (name,)
        for dep in services[name].get("depends_on") or {}:
            visit(dep, path + (name,))
        seen.add(name)

    for name in services:
        visit(name, ())


def test_long_running_services_have_healthchecks(compose):
    for name, s in compose["services"].items():
        if s.get("restart") == "no":
            continue
        check = s.get("healthcheck")
        assert check and not check.get("disable") and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert s.get("restart") == "unless-stopped", name


def test_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and (d.get("count") == "all" or int(d.get("count", 0)) >= 1) for d in devices), devices
    assert compose["services"]["worker"]["environment"]["SVDFORGE_DEVICE"] == "cuda"
    assert "deploy" not in compose["services"]["api"]


def test_environment_is_made_of_real_settings(compose, monkeypatch, tmp_path):
    core_sources = "".join(p.read_text() for p in (ROOT / "core").rglob("*.py"))
    assert all(name in core_sources for name in CORE_ENV)
    fields = {f"SVDFORGE_{name.upper()}" for name in Settings.model_fields}
    dockerfile_env = {}
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        for instr, args in final_stage(dockerfile(name)):
            if instr == "ENV":
                pairs = (kv.split("=", 1) for kv in shlex.split(args) if "=" in kv)
                dockerfile_env.update({k: v for k, v in pairs if k != "PATH"})
    for name in ("api", "worker", "migrate"):
        env = {**dockerfile_env, **compose["services"][name]["environment"]}
        for var in env:
            if var.startswith("SVDFORGE_"):
                assert var in fields | CORE_ENV, f"{name}: {var} is not a setting"
            else:
                assert var in OTHER_ENV or var.startswith(("PYTHON", "NVIDIA_", "HF_")), f"{name}: {var}"
        for var in list(os.environ):
            if var.startswith("SVDFORGE_"):
                monkeypatch.delenv(var)
        for var, value in env.items():
            monkeypatch.setenv(var, str(value))
        monkeypatch.setenv("SVDFORGE_DATA_DIR", str(tmp_path))
        s = Settings()  # the values parse, and describe the production topology
        assert (s.storage, s.is_sqlite, s.broker_url, str(s.model_root)) == ("s3", False, "redis://redis:6379/0",
                                                                            "/models")
        assert not s.allow_pickle and not s.trust_remote_code


def test_volumes_are_declared_and_models_are_read_only(compose):
    declared = set(compose["volumes"])
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            source = v.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, (name, v)
            if v.split(":")[1] == "/models":
                assert v.endswith(":ro"), (name, v)


def test_builds_point_at_the_dockerfiles(compose):
    for name, s in compose["services"].items():
        if "build" in s:
            context = (DOCKER / s["build"]["context"]).resolve()
            assert context == ROOT and (context / s["build"]["dockerfile"]).is_file(), name
            assert s["image"] in OUR_IMAGES
        else:
            image = s["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


# --- Dockerfiles ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_basics(name):
    instructions = dockerfile(name)
    final = final_stage(instructions)
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert [i for i, _ in final].count("CMD") == 1 and isinstance(image_cmd(name), list)  # exec form
    args = {a.split("=")[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a}
    for instr, a in instructions:
        if instr == "FROM":
            base = a.split()[0]
            base = args.get(base.strip("${}"), base)
            assert ":" in base and not base.endswith(":latest"), base
        if instr == "COPY" and not a.startswith("--from"):
            for src in shlex.split(a)[:-1]:
                assert (ROOT / src).exists(), src
    text = " ".join(a for _, a in instructions)
    assert "PIP_CONSTRAINT=" in text and "pip install" in text
    expect_cuda = name == "Dockerfile.worker"
    assert ("torch.version.cuda is None" in text) is not expect_cuda  # the build checks which torch it got
    if expect_cuda:
        assert "sed 's/^torch==\\([^+]*\\)+cpu$/torch==\\1/'" in text
        line = next(ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.startswith("torch=="))
        converted = subprocess.run(["sed", r"s/^torch==\([^+]*\)+cpu$/torch==\1/"], input=line, text=True,
                                   capture_output=True, check=True).stdout.strip()
        assert converted == line.removesuffix("+cpu") and "+" not in converted


def test_dockerignore_keeps_what_the_build_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", "constraints.txt", "alembic.ini", project["project"]["readme"],
              "migrations/versions/0001_initial.py", "migrations/env.py"]
    needed += list(project["tool"]["setuptools"]["package-dir"].values())  # the package folders
    for path in needed:
        assert (ROOT / path).exists() and not dockerignored(path), path
    for path in (".git", ".venv", "tests/service/test_docker.py", "core/__pycache__/x.pyc", "var/svdforge.db"):
        assert dockerignored(path), path


# --- the commands the containers run ---------------------------------------------------
def all_commands(compose) -> list[list[str]]:
    cmds = [image_cmd("Dockerfile.api"), image_cmd("Dockerfile.worker")]
    for s in compose["services"].values():
        if s.get("image") in OUR_IMAGES:
            if "command" in s:
                cmds.append(s["command"])
            if "healthcheck" in s:
                cmds.append(s["healthcheck"]["test"][1:])
    return cmds


def local(cmd: list[str], port: int | None = None) -> list[str]:
    """A container command as it runs here: the same program and arguments, this interpreter."""
    program = {"svdforge": [sys.executable, "-m", "svdforge.cli.main"], "uvicorn": [sys.executable, "-m", "uvicorn"],
               "python": [sys.executable], "celery": [sys.executable, "-m", "celery"]}[cmd[0]]
    args = list(cmd[1:])
    if port is not None:
        args = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in args]
        if "--port" in args:
            args[args.index("--port") + 1] = str(port)
        if "--host" in args:
            args[args.index("--host") + 1] = "127.0.0.1"
    return program + args


def test_commands_name_real_programs(compose):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["svdforge"] == "svdforge.cli.main:main"
    deps = " ".join(project["project"]["dependencies"])
    env = dict(os.environ)
    for cmd in all_commands(compose):
        if cmd[0] == "svdforge":
            p = subprocess.run(local([cmd[0], cmd[1], "--help"]), capture_output=True, text=True, env=env,
                               timeout=60)
            assert p.returncode == 0, (cmd, p.stderr)
        elif cmd[0] == "uvicorn":
            assert "uvicorn" in deps and "--factory" in cmd
            module, attr = cmd[cmd.index("--factory") + 1].split(":")
            assert callable(getattr(importlib.import_module(module), attr))
        elif cmd[0] == "python":
            assert cmd[1] == "-c"
            compile(cmd[2], "<healthcheck>", "exec")
        else:
            pytest.fail(f"unexpected program in {cmd}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, f"{what}: process exited with {p.returncode}"
        time.sleep(0.25)
    pytest.fail(f"{what} within {timeout} s")


def _stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_image_install_holds_the_service_and_its_migrations(image_site):
    for path in ("api/main.py", "worker/app.py", "cli/main.py", "persistence/migrate.py",
                 "persistence/queue.py", "core/pipeline.py",
                 "migrations/env.py", "migrations/versions/0001_initial.py", "migrations/script.py.mako"):
        path = f"svdforge/{path}"
        assert (image_site / path).is_file(), path
    assert not (image_site / "tests").exists() and not (image_site / "bench").exists()


def test_the_images_commands_run(compose, image_site, tmp_path):
    """migrate, the API's CMD and healthcheck, the worker's CMD and healthcheck, and key creation
    as README says, with the compose file's own argument lists, on the package installed as the
    image installs it (embedded backends: SQLite, local folder, filesystem queue)."""
    services = compose["services"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVDFORGE_")}
    env.update(PYTHONPATH=str(image_site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               SVDFORGE_DATA_DIR=str(tmp_path / "var"),
               SVDFORGE_MODEL_ROOT=str(tmp_path / "models"), SVDFORGE_CACHE=str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    cwd = tmp_path / "home"
    cwd.mkdir()

    def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(local(cmd, **kw), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)

    worker_check = services["worker"]["healthcheck"]["test"][1:]
    assert run(worker_check).returncode == 1  # the healthcheck fails on an unmigrated database
    migrated = run(services["migrate"]["command"])
    assert migrated.returncode == 0, migrated.stderr
    port = _free_port()
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("api", "worker")}  # noqa: SIM115 - the children write to them until they stop
    api = subprocess.Popen(local(image_cmd("Dockerfile.api"), port=port), cwd=cwd, env=env,
                           stdout=logs["api"], stderr=subprocess.STDOUT)
    worker = None
    try:
        def api_up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
            except OSError:
                return False

        _wait_for(api_up, 60, "the API did not answer", [api])
        health = run(services["api"]["healthcheck"]["test"][1:], port=port)
        assert health.returncode == 0, health.stderr
        created = run(["svdforge", "keys", "create", "--name", "docker"])
        token = created.stdout.strip()
        assert created.returncode == 0 and token.startswith("svdf_") and token not in created.stderr
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert urllib.request.urlopen(req, timeout=10).status == 200  # noqa: S310 - a loopback http URL

        worker = subprocess.Popen(local(image_cmd("Dockerfile.worker")), cwd=cwd, env=env,
                                  stdout=logs["worker"], stderr=subprocess.STDOUT)
        _wait_for(lambda: " ready." in (tmp_path / "worker.log").read_text(), 120, "the worker was not ready",
                  [worker])
        check = run(worker_check)
        assert check.returncode == 0, check.stderr
        assert _stop(worker) == 0
    finally:
        if worker is not None:
            _stop(worker)
        _stop(api)
        for f in logs.values():
            f.close()
    for name in ("api", "worker"):
        text = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in text, text[-2000:]
        assert token not in text and token[12:] not in text  # the key is never logged

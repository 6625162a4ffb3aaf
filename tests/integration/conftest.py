"""Integration suite (marker `integration`): real Redis, PostgreSQL and S3 (SeaweedFS)
servers on 127.0.0.1, started once per session and stopped by PID; the API (uvicorn) and
workers (celery) as separate processes, one deployment (database, bucket) per test.

Without the servers installed the suite is skipped with the reason, except under
SVDFORGE_REQUIRE_SERVERS=1 (CI: .ci/run sets it after .ci/servers installed them), where
it fails instead.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import time
from pathlib import Path

import pytest

from .servers import Servers, Stack, missing

REQUIRED = os.environ.get("SVDFORGE_REQUIRE_SERVERS") == "1"
TERMINAL = {"succeeded", "failed", "cancelled"}
# Seconds for one tiny job; the fault tests make longer ones with real request options.
TINY = {"calibration": {"source": "builtin", "samples": 4, "seq_len": 32},
        "evaluation": {"source": "builtin", "seq_len": 32, "max_tokens": 256, "throughput": False}}


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    absent = missing()
    if absent:
        reason = "integration servers not installed: " + "; ".join(absent) + " (run .ci/servers)"
        if REQUIRED:
            pytest.fail(reason + " and SVDFORGE_REQUIRE_SERVERS=1", pytrace=False)
        pytest.skip(reason)
    srv = Servers.start(tmp_path_factory.mktemp("servers"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    from svdforge.core.testing import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny", arch="llama")
    return root


_redis_dbs = itertools.cycle(range(1, 16))  # a Redis database per deployment: no message reaches another test


@pytest.fixture
def make_stack(servers, model_root, tmp_path, request):
    """`make_stack(**settings)`: a fresh deployment (database, bucket) on the session's servers."""
    stacks: list[Stack] = []

    def make(**settings) -> Stack:
        digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:6]
        name = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:32].strip("_") + f"_{digest}_{len(stacks)}"
        values = {"progress_interval_s": 0.2, **settings}
        stack = Stack(servers, tmp_path / name, name, model_root=model_root, redis_db=next(_redis_dbs), **values)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            for proc in stack.procs:
                print(f"--- {proc.name} ({proc.log}) ---\n{proc.tail(3000)}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def wait_job(client, job_id: str, until=lambda job: job["status"] in TERMINAL, timeout: float = 120,
             interval: float = 0.1) -> dict:
    """Poll GET /v1/jobs/{id} until `until(job)`; tolerates an API that is down for a while."""
    import httpx

    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        try:
            r = client.get(f"/v1/jobs/{job_id}")
            if r.status_code == 200:
                job = r.json()
                if until(job):
                    return job
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise AssertionError(f"job {job_id} not there in {timeout:.0f} s; last seen {job}")

"""Operations: GET /metrics (Prometheus text, parsed back) and the JSON log lines.

One real job on the tiny model runs in-process while the API logs to a captured stderr; the
other tests build apps or insert rows and take a fraction of a second each."""
from __future__ import annotations

import io
import json
import logging
import re
import sys
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import func, select

from svdforge.api.main import create_app
from svdforge.persistence.db import Database
from svdforge.persistence.ids import new_id
from svdforge.persistence.keys import create_key
from svdforge.persistence.logs import JsonFormatter, configure_logging, log_context
from svdforge.persistence.metrics import ServiceCollector
from svdforge.persistence.state import JobStatus
from svdforge.persistence.storage import make_storage
from svdforge.persistence.tables import ApiKey, Artifact, Job, utcnow
from svdforge.worker.runner import JobRunner

from .conftest import TINY_REQUEST_OPTIONS, fresh_database, make_settings
from .test_api_jobs import assert_problem


def families(text: str) -> dict[str, list]:
    """Family name -> its samples (name, labels, value), from the exposition text."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str | None = None, **labels) -> float:
    found = [s.value for s in fams[family] if s.name == (name or family) and
             all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, name, labels, fams[family])
    return found[0]


def scrape(client, **headers) -> dict[str, list]:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return families(r.text)


# --- a real job, with its logs captured ---------------------------------------------------
@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_model_root):
    settings = make_settings(tmp_path_factory.mktemp("ops"), model_root=tiny_model_root, log_format="json")
    db = fresh_database(settings)
    with db.begin() as s:
        _, token = create_key(s, "ops")
    auth = {"Authorization": f"Bearer {token}"}
    captured, saved_stderr = io.StringIO(), sys.stderr
    sys.stderr = captured  # svdforge's handler writes to whatever sys.stderr is now
    try:
        with TestClient(create_app(settings)) as client:
            client.get("/v1/jobs", headers=auth)
            body = {"model": str(tiny_model_root / "tiny"), "ratio": 0.4, **TINY_REQUEST_OPTIONS}
            r = client.post("/v1/jobs", json=body, headers={**auth, "X-Request-ID": "req-ops-1"})
            assert r.status_code == 201 and r.headers["x-request-id"] == "req-ops-1", r.text
            job_id = r.json()["id"]
            assert JobRunner(db, make_storage(settings), settings).run(job_id) == "succeeded"
            for _ in range(3):
                assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
            assert client.get("/v1/jobs/job_nosuchjob", headers=auth).status_code == 404
            assert client.post("/v1/jobs", json=body).status_code == 401  # refused before routing
            text = client.get("/metrics").text
            text_again = client.get("/metrics").text
    finally:
        sys.stderr = saved_stderr
    with db.session() as s:
        art_bytes, n_art = s.execute(select(func.sum(Artifact.bytes), func.count()).where(
            Artifact.job_id == job_id)).one()
    yield {"job": job_id, "token": token, "log": captured.getvalue(), "metrics": families(text),
           "again": families(text_again), "artifact_bytes": art_bytes, "artifacts": n_art}
    db.dispose()


def test_every_log_line_is_json_and_carries_its_ids(ran):
    lines = [json.loads(line) for line in ran["log"].splitlines()]  # each line parses
    assert len(lines) > 10
    assert all({"ts", "level", "logger", "message"} <= set(rec) for rec in lines)
    worker = [rec for rec in lines if rec["logger"].startswith("svdforge.worker")]
    assert worker and all(rec.get("job_id") == ran["job"] for rec in worker)
    assert {"job running", "job succeeded"} <= {rec["message"].split(" on ")[0] for rec in worker}
    access = [rec for rec in lines if rec["logger"] == "svdforge.api.access"]
    assert access and all(re.fullmatch(r"[A-Za-z0-9._:/+=@-]+", rec["request_id"]) for rec in access)
    post = [rec for rec in access if rec["method"] == "POST" and rec["status"] == 201]
    assert len(post) == 1 and post[0]["request_id"] == "req-ops-1" and post[0]["job_id"] == ran["job"]
    assert post[0]["route"] == "/v1/jobs" and post[0]["duration_ms"] > 0
    created = [rec for rec in lines if rec["message"].startswith("job created")]
    assert len(created) == 1 and created[0]["request_id"] == "req-ops-1" and created[0]["job_id"] == ran["job"]
    gets = [rec for rec in access if rec["route"] == "/v1/jobs/{job_id}" and rec["status"] == 200]
    assert len(gets) == 3 and all(rec["job_id"] == ran["job"] for rec in gets)
    assert len({rec["request_id"] for rec in gets}) == 3  # generated, one per request


def test_no_key_in_the_logs(ran):
    token = ran["token"]
    assert token not in ran["log"] and token[12:] not in ran["log"]
    assert "authorization" not in ran["log"].lower()


def test_metrics_after_a_real_job(ran):
    m = ran["metrics"]
    assert sample(m, "svdforge_jobs", status="succeeded") == 1
    assert sample(m, "svdforge_jobs", status="queued") == 0
    assert sample(m, "svdforge_queue_depth") == 0
    assert sample(m, "svdforge_jobs_finished", "svdforge_jobs_finished_total", outcome="succeeded") == 1
    assert sample(m, "svdforge_jobs_finished", "svdforge_jobs_finished_total", outcome="failed") == 0
    assert sample(m, "svdforge_job_duration_seconds", "svdforge_job_duration_seconds_count", outcome="succeeded") == 1
    assert sample(m, "svdforge_job_duration_seconds", "svdforge_job_duration_seconds_sum", outcome="succeeded") > 0
    for stage in ("load", "whiten", "svd", "evaluate", "upload"):
        assert sample(m, "svdforge_job_stage_duration_seconds", "svdforge_job_stage_duration_seconds_count",
                      stage=stage) == 1, stage
    assert sample(m, "svdforge_job_stage_duration_seconds", "svdforge_job_stage_duration_seconds_count",
                  stage="recover") == 0  # skipped: not completed
    assert ran["artifact_bytes"] > 0 and sample(m, "svdforge_artifact_bytes") == ran["artifact_bytes"]
    assert sample(m, "svdforge_artifacts") == ran["artifacts"]
    assert sample(m, "svdforge_database_up") == 1
    assert sample(m, "process_resident_memory_bytes") > 0
    # a second scrape reads only what finished since: the job is not counted twice
    assert sample(ran["again"], "svdforge_job_duration_seconds", "svdforge_job_duration_seconds_count",
                  outcome="succeeded") == 1


def test_http_histogram_labels_are_route_templates(ran):
    m = ran["metrics"]
    h = "svdforge_http_request_duration_seconds"
    count = f"{h}_count"
    assert sample(m, h, count, method="GET", route="/v1/jobs/{job_id}", status="200") == 3
    assert sample(m, h, count, method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert sample(m, h, count, method="POST", route="/v1/jobs", status="201") == 1
    assert sample(m, h, count, method="POST", route="/v1/jobs", status="401") == 1
    assert sample(m, h, f"{h}_bucket", method="POST", route="/v1/jobs", status="201", le="+Inf") == 1
    routes = {s.labels["route"] for s in m[h]}
    assert not any(ran["job"] in r or "job_nosuchjob" in r for r in routes), routes


# --- request ids ---------------------------------------------------------------------------
def test_request_id_is_echoed_if_sane_else_generated(settings, db, auth):
    app = create_app(settings)

    def boom() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/healthz", headers={"X-Request-ID": "abc-123_x.y:z"}).headers["x-request-id"] == "abc-123_x.y:z"
        for bad in ("has space", "x" * 129, "semi;colon", ""):
            rid = c.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
            assert rid != bad and re.fullmatch(r"[0-9a-f]{32}", rid)
        r = c.post("/v1/jobs", json={})  # refused by the key middleware, before any route
        assert_problem(r, 401) and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        r = c.get("/boom", headers={"X-Request-ID": "req-500"})
        assert_problem(r, 500, "internal_error")
        assert r.headers["x-request-id"] == "req-500"
        fams = scrape(c)
    h = "svdforge_http_request_duration_seconds"
    assert sample(fams, h, f"{h}_count", method="GET", route="/boom", status="500") == 1
    assert sample(fams, h, f"{h}_count", method="GET", route="/healthz", status="200") == 5


# --- settings ------------------------------------------------------------------------------
def test_metrics_disabled_is_404(tmp_path):
    settings = make_settings(tmp_path, metrics_enabled=False)
    fresh_database(settings).dispose()
    with TestClient(create_app(settings)) as c:
        assert_problem(c.get("/metrics"), 404)
        assert c.get("/healthz").status_code == 200


def test_metrics_on_their_own_port(tmp_path):
    settings = make_settings(tmp_path, metrics_port=0, metrics_host="127.0.0.1")
    fresh_database(settings).dispose()
    app = create_app(settings)
    with TestClient(app) as c:
        assert_problem(c.get("/metrics"), 404)  # not on the API's port
        assert c.get("/healthz").status_code == 200
        port = app.state.metrics_server.server_port
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200
        fams = families(r.text)
        assert sample(fams, "svdforge_database_up") == 1
        h = "svdforge_http_request_duration_seconds"
        assert sample(fams, h, f"{h}_count", method="GET", route="/healthz", status="200") == 1
    with pytest.raises(httpx.ConnectError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_token(tmp_path):
    settings = make_settings(tmp_path, metrics_token="scrape-me")
    fresh_database(settings).dispose()
    with TestClient(create_app(settings)) as c:
        assert_problem(c.get("/metrics"), 401, "unauthorized")
        assert_problem(c.get("/metrics", headers={"Authorization": "Bearer nope"}), 401)
        assert "svdforge_jobs" in scrape(c, Authorization="Bearer scrape-me")
    with pytest.raises(ValidationError, match="SVDFORGE_METRICS_TOKEN"):
        make_settings(tmp_path, metrics_token="x", metrics_port=9100)
    assert make_settings(tmp_path, metrics_token="x").as_env()["SVDFORGE_METRICS_TOKEN"] == "x"


# --- the database collector, from rows -----------------------------------------------------
def _insert_job(s, owner: str, status: str, *, ran_s: float | None = None, stages=None, code=None,
                ago_s: float = 0.0) -> str:
    now = utcnow() - timedelta(seconds=ago_s)
    started = now - timedelta(seconds=ran_s) if ran_s is not None else None
    job = Job(id=new_id("job"), owner_id=owner, status=status, model="m", request={}, meta={}, stages=stages or {},
              request_hash="h", created_at=now - timedelta(seconds=100), updated_at=now, started_at=started,
              finished_at=now if status in ("succeeded", "failed", "cancelled") else None, error_code=code,
              worker_id="w1" if status == "running" else None,
              lease_expires_at=now - timedelta(seconds=5) if status == "running" else None)
    s.add(job)
    return job.id


def collect(db: Database, collector: ServiceCollector | None = None) -> dict[str, list]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or ServiceCollector(db))
    return families(generate_latest(registry).decode())


def test_collector_figures_from_rows(db):
    with db.begin() as s:
        owner = s.scalar(select(ApiKey.id)) or create_key(s, "o")[0].id
        done = _insert_job(s, owner, "succeeded", ran_s=42.0,
                           stages={"whiten": {"status": "completed", "seconds": 3.0},
                                   "recover": {"status": "skipped"}})
        _insert_job(s, owner, "failed", ran_s=0.5, code="invalid_input")
        _insert_job(s, owner, "failed", ran_s=7.0, code="worker_lost")
        _insert_job(s, owner, "cancelled")  # cancelled while queued: never ran
        _insert_job(s, owner, "queued", ago_s=0)
        _insert_job(s, owner, "running")
        s.add(Artifact(id=new_id("art"), job_id=done, name="a", bytes=1000, sha256="0" * 64,
                       content_type="x", storage_key="k1"))
        s.add(Artifact(id=new_id("art"), job_id=done, name="b", bytes=234, sha256="0" * 64,
                       content_type="x", storage_key="k2"))
    collector = ServiceCollector(db)
    m = collect(db, collector)
    assert [sample(m, "svdforge_jobs", status=st.value) for st in JobStatus] == [1, 1, 0, 1, 2, 1]
    assert sample(m, "svdforge_queue_depth") == 1
    assert 99 <= sample(m, "svdforge_queue_oldest_age_seconds") < 200
    assert sample(m, "svdforge_workers_busy") == 1 and sample(m, "svdforge_jobs_lease_expired") == 1
    assert sample(m, "svdforge_jobs_failed", "svdforge_jobs_failed_total", code="worker_lost") == 1
    assert sample(m, "svdforge_artifact_bytes") == 1234 and sample(m, "svdforge_artifacts") == 2
    dur = "svdforge_job_duration_seconds"
    assert sample(m, dur, f"{dur}_bucket", outcome="succeeded", le="30.0") == 0
    assert sample(m, dur, f"{dur}_bucket", outcome="succeeded", le="60.0") == 1
    assert sample(m, dur, f"{dur}_bucket", outcome="failed", le="1.0") == 1
    assert sample(m, dur, f"{dur}_count", outcome="failed") == 2
    assert sample(m, dur, f"{dur}_count", outcome="cancelled") == 0
    assert 41.9 < sample(m, dur, f"{dur}_sum", outcome="succeeded") < 42.1
    st = "svdforge_job_stage_duration_seconds"
    assert sample(m, st, f"{st}_bucket", stage="whiten", le="2.5") == 0
    assert sample(m, st, f"{st}_bucket", stage="whiten", le="5.0") == 1
    assert sample(m, st, f"{st}_count", stage="recover") == 0
    # the next scrape adds only the job that finished since
    with db.begin() as s:
        _insert_job(s, owner, "succeeded", ran_s=2.0, stages={"whiten": {"status": "completed", "seconds": 1.0}})
    m = collect(db, collector)
    assert sample(m, dur, f"{dur}_count", outcome="succeeded") == 2
    assert sample(m, st, f"{st}_count", stage="whiten") == 2
    assert sample(m, "svdforge_jobs_finished", "svdforge_jobs_finished_total", outcome="succeeded") == 2
    assert collect(db, collector)[dur] == m[dur]  # nothing new: the same counts
    assert collect(db)[dur] == m[dur]  # a new process (another replica) counts the same


def test_collector_says_when_the_database_is_down(tmp_path):
    settings = make_settings(tmp_path, database_url=f"sqlite:///{tmp_path}/missing/nope.db")
    m = collect(Database(settings))
    assert sample(m, "svdforge_database_up") == 0 and "svdforge_jobs" not in m


# --- formats -------------------------------------------------------------------------------
def test_formatters_carry_the_scope_and_mask_keys(capsys):
    log = logging.getLogger("svdforge.test_ops")
    try:
        configure_logging("json", "INFO")
        with log_context(job_id="job_1", request_id="r1"):
            log.info("using svdf_%s", "A" * 43, extra={"header": "Bearer abc.def",
                                                        "data": {"n": 2, "keys": ["svdf_" + "B" * 43]}})
        rec = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert rec["job_id"] == "job_1" and rec["request_id"] == "r1"
        assert rec["message"] == "using [redacted]" and rec["header"] == "[redacted]"
        assert rec["data"] == {"n": 2, "keys": ["[redacted]"]}  # a structure stays one
        configure_logging("text", "INFO")
        with log_context(job_id="job_2"):
            log.warning("hello")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "WARNING svdforge.test_ops [job_id=job_2] hello" in line
        assert JsonFormatter().format(logging.makeLogRecord({"msg": "plain"})).startswith('{"ts": ')
    finally:
        configure_logging("json", "INFO")


def test_the_monitor_thread_logs_in_the_jobs_scope(settings, capsys):
    """The worker's monitor thread (heartbeat) runs in the job's scope: its lines carry the id."""
    import time

    from svdforge.worker.runner import JobMonitor

    class DatabaseDown:
        def begin(self):
            raise OSError("database down")

    configure_logging("json", "INFO")
    with log_context(job_id="job_monitored"):
        monitor = JobMonitor(DatabaseDown(), "job_monitored", settings, attempt=1)
    monitor.start()  # outside the scope: the thread took the context it was built in
    err, deadline = "", time.monotonic() + 30
    while "progress write failed" not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capsys.readouterr().err
    monitor.stop()
    failed = [json.loads(line) for line in err.splitlines() if "progress write failed" in line]
    assert failed and all(rec["job_id"] == "job_monitored" and "exc_info" in rec for rec in failed)

"""End to end: `svdforge serve` (uvicorn + a real Celery worker process on the filesystem
queue) runs a tiny-model job; the client follows its events, downloads every artifact,
checks sha256 three ways and loads the result; a second job is cancelled while running."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import TEST_DATABASE_URL, TINY_REQUEST_OPTIONS, fresh_database, make_settings

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root):
    data = tmp_path_factory.mktemp("e2e") / "data"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SVDFORGE_MODEL_ROOT": str(tiny_model_root),
           "SVDFORGE_PROGRESS_INTERVAL_S": "0.2", "SVDFORGE_WORKER_THREADS": "1",
           "SVDFORGE_WEBHOOKS_ALLOW_PRIVATE": "true", "SVDFORGE_WEBHOOKS_POLL_S": "0.2"}
    for name in ("SVDFORGE_DATABASE_URL", "SVDFORGE_BROKER_URL", "SVDFORGE_STORAGE", "SVDFORGE_STORAGE_DIR"):
        env.pop(name, None)
    if TEST_DATABASE_URL:  # the same run on PostgreSQL
        fresh_database(make_settings(data.parent)).dispose()
        env["SVDFORGE_DATABASE_URL"] = TEST_DATABASE_URL
    log = open(data.parent / "serve.log", "w")  # noqa: SIM115 - the service child writes to it until it stops
    proc = subprocess.Popen([sys.executable, "-m", "svdforge.cli.service_cmds", "serve", "--port", str(port),
                             "--data-dir", str(data)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (data.parent / "serve.log").read_text()
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("serve did not become ready:\n" + (data.parent / "serve.log").read_text())
    key = (data / "api_key").read_text().strip()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        yield {"client": client, "data": data, "model": str(tiny_model_root / "tiny"), "log": data.parent / "serve.log"}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def follow(client: httpx.Client, job_id: str, timeout_s: float = 240) -> tuple[dict, list[dict]]:
    """Poll the job and page through its events (as a client would) until it ends."""
    events: list[dict] = []
    after = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        params = {"limit": 1000, **({"after": after} if after else {})}
        page = client.get(f"/v1/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        after = page["last_id"] or after
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL and not page["has_more"]:
            events += client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 1000}).json()["data"]
            return job, events
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s")


def test_real_job_through_celery_and_download(server, tmp_path):
    client = server["client"]
    r = client.post("/v1/jobs", json={"model": server["model"], "ratio": 0.4, **TINY_REQUEST_OPTIONS},
                    headers={"Idempotency-Key": "e2e-1"})
    assert r.status_code == 201, r.text
    job, events = follow(client, r.json()["id"])
    assert job["status"] == "succeeded", (job, server["log"].read_text()[-3000:])
    assert job["attempt"] == 1 and job["progress"] == 1.0
    assert [e["id"] for e in events] == sorted({e["id"] for e in events}, key=lambda i: int(i[4:]))  # no dupes
    statuses = [e["data"]["to"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    assert {"stage_started", "stage_finished", "progress", "metrics"} <= {e["type"] for e in events}

    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    out = tmp_path / "artifact"
    out.mkdir()
    for a in artifacts:
        digest = hashlib.sha256()
        with client.stream("GET", a["content_url"]) as resp, open(out / a["name"], "wb") as f:
            assert resp.status_code == 200
            for chunk in resp.iter_bytes():
                digest.update(chunk)
                f.write(chunk)
            header = resp.headers["x-content-sha256"]
        assert digest.hexdigest() == a["sha256"] == header, a["name"]
    assert (out / "model.safetensors").stat().st_size > 0

    from svdforge.core.artifact import load_artifact

    model, tok = load_artifact(out, verify=True)  # the manifest's sha256 agree with the download
    import torch

    with torch.no_grad():
        logits = model(**tok("To be, or not to be", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["metrics"]["compressed"]["ppl"] > 0
    # the work folder is gone; the artifacts are in the store under the job's attempt
    assert not (server["data"] / "work" / job["id"]).exists()
    assert (server["data"] / "storage" / "artifacts" / job["id"] / "1" / "model.safetensors").is_file()
    # operations: the API and the worker process log JSON lines (the worker's carry the job's
    # id, Celery's own go through the same handler), and /metrics counts the job
    records = [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith("{")]
    mine = [rec for rec in records if rec["logger"] == "svdforge.worker" and rec.get("job_id") == job["id"]]
    assert "job succeeded" in {rec["message"] for rec in mine}, records[-20:]
    assert any(rec["logger"] == "celery.app.trace" and rec.get("job_id") == job["id"] for rec in records), \
        records[-20:]  # Celery's own line about the task, through the same handler, in the job's scope
    assert any(rec["logger"] == "svdforge.api" and rec.get("job_id") == job["id"] for rec in records)
    assert 'svdforge_jobs{status="succeeded"}' in client.get("/metrics").text


def sse_events(client: httpx.Client, job_id: str, **headers: str) -> list[dict]:
    """Read a job's text/event-stream until the server closes it: (id, event, data) of each message."""
    out, msg = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream", **headers},
                       timeout=httpx.Timeout(30, read=240)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        for line in r.iter_lines():
            if line == "":
                if "event" in msg:
                    out.append(msg)
                msg = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                msg[name] = json.loads(value) if name == "data" else value
    return out


def test_a_real_job_followed_by_its_event_stream(server):
    client = server["client"]
    r = client.post("/v1/jobs", json={"model": server["model"], "ratio": 0.4, **TINY_REQUEST_OPTIONS})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    streamed = sse_events(client, job_id)  # attached while the job is queued or running: it ends by itself
    ids = [int(m["id"][4:]) for m in streamed]
    assert ids == sorted(set(ids)) and len(ids) > 5  # strictly increasing
    assert all(m["id"] == m["data"]["id"] and m["event"] == m["data"]["type"] for m in streamed)
    last = streamed[-1]
    assert last["event"] == "status" and last["data"]["data"]["to"] == "succeeded", server["log"].read_text()[-3000:]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    listed = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert [m["data"] for m in streamed] == listed  # the same items as the list, none lost or repeated
    middle = len(streamed) // 2
    rest = sse_events(client, job_id, **{"Last-Event-ID": streamed[middle]["id"]})
    assert rest == streamed[middle + 1:]


def test_cancel_a_running_job_through_celery(server):
    client = server["client"]
    body = {"model": server["model"], "ratio": 0.4,
            "calibration": {"source": "builtin", "samples": 64, "seq_len": 128},
            "adapter": {"type": "lora", "rank": 4, "max_steps": 200,
                        "data": {"source": "builtin", "samples": 64, "seq_len": 128}},
            "evaluation": {"source": "builtin", "seq_len": 64, "max_tokens": 8192, "throughput": False}}
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "succeeded")
    job, events = follow(client, job_id)
    assert job["status"] == "cancelled", job
    assert job["error"] is None and job["cancel_requested_at"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
    assert not (server["data"] / "storage" / "artifacts" / job_id).exists()
    assert not (server["data"] / "work" / job_id).exists()
    assert [e["data"]["to"] for e in events if e["type"] == "status"] == [
        "queued", "running", "cancelling", "cancelled"]


def test_the_workers_dispatcher_delivers_webhooks(server):
    """The dispatcher runs in `serve`'s worker process: a running job's events reach a receiver."""
    from .test_webhooks import Receiver, verify

    client, rx = server["client"], Receiver()
    try:
        hook = client.post("/v1/webhooks", json={"url": rx.url, "events": ["job.running", "job.cancelled"]}).json()
        body = {"model": server["model"], "ratio": 0.4, "calibration": {"source": "builtin", "samples": 64,
                                                                         "seq_len": 128}}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while not rx.requests:  # job.running, sent by the worker while the job runs
            assert time.monotonic() < deadline, server["log"].read_text()[-3000:]
            time.sleep(0.1)
        client.post(f"/v1/jobs/{job_id}/cancel")
        job, _ = follow(client, job_id)
        while len(rx.requests) < 2 and job["status"] == "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        rx.close()
    assert job["status"] == "cancelled", job
    events = [json.loads(r["body"]) for r in rx.requests]
    assert [e["type"] for e in events] == ["job.running", "job.cancelled"]
    assert events[1]["data"] == job
    assert all(verify(hook["secret"], r["headers"], r["body"]) for r in rx.requests)

"""The production topology end to end: uvicorn API and a Celery worker as separate
processes on PostgreSQL, Redis and an S3 server; a job over HTTP, artifacts downloaded
through the API and through presigned S3 URLs, every sha256 checked."""
from __future__ import annotations

import hashlib

import httpx

from ..service.sse import messages
from .conftest import TINY, wait_job


def test_a_job_end_to_end_over_http(make_stack, model_root):
    stack = make_stack()
    stack.start_api()
    stack.start_worker("w1")
    with stack.client() as client:
        ready = client.get("/readyz").json()
        assert ready["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
        r = client.post("/v1/jobs", json={"model": str(model_root / "tiny"), "ratio": 0.4, **TINY},
                        headers={"Idempotency-Key": "topology-1"})
        assert r.status_code == 201, r.text
        job = wait_job(client, r.json()["id"])
        assert job["status"] == "succeeded" and job["attempt"] == 1, job
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        assert {"model.safetensors", "config.json", "report.json", "svdforge.json"} <= {a["name"] for a in artifacts}
        for a in artifacts:
            via_api = client.get(a["content_url"])
            assert via_api.status_code == 200
            assert hashlib.sha256(via_api.content).hexdigest() == a["sha256"] == via_api.headers["x-content-sha256"]
            assert a["download_url"].startswith(stack.servers.s3.endpoint)
            via_s3 = httpx.get(a["download_url"], timeout=30)
            assert via_s3.status_code == 200 and hashlib.sha256(via_s3.content).hexdigest() == a["sha256"]
    keys = stack.servers.s3.keys(stack.bucket, f"artifacts/{job['id']}/")
    assert sorted(keys) == sorted(f"artifacts/{job['id']}/1/{a['name']}" for a in artifacts)


def test_an_event_stream_follows_a_job_to_its_end(make_stack, model_root):
    """text/event-stream through uvicorn on PostgreSQL while a Celery worker on Redis runs the job."""
    stack = make_stack(sse_poll_s=0.25, sse_keepalive_s=1)
    stack.start_api()
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json={"model": str(model_root / "tiny"), "ratio": 0.4, **TINY}).json()["id"]
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"},
                           timeout=httpx.Timeout(30, read=120)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            stream = messages(r.iter_lines())
            first = next(stream)
            assert first.event == "status" and first.json["data"]["to"] == "queued"
            assert next(stream).comments  # nothing happens before a worker exists: a keep-alive
            stack.start_worker("w1")  # attached while queued: the stream follows the whole run
            got = [first, *(m for m in stream if m.event)]  # ends when the server closes it
        ids = [int(m.id[4:]) for m in got]
        assert ids == sorted(set(ids))
        assert got[-1].event == "status" and got[-1].json["data"]["to"] == "succeeded"
        assert {"stage_started", "progress", "metrics"} <= {m.event for m in got}
        listed = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        assert [m.json for m in got] == listed
        with client.stream("GET", f"/v1/jobs/{job_id}/events",
                           headers={"Accept": "text/event-stream", "Last-Event-ID": got[3].id}) as r:
            assert [m.json for m in messages(r.iter_lines()) if m.event] == listed[4:]

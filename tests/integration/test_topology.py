"""The production topology end to end: uvicorn API and a Celery worker as separate
processes on PostgreSQL, Redis and an S3 server; a job over HTTP, artifacts downloaded
through the API and through presigned S3 URLs, every sha256 checked."""
from __future__ import annotations

import hashlib

import httpx

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

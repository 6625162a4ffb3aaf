"""A real job (tiny model, real core pipeline, in-process runner), then the artifact and
report endpoints: listing, metadata, full and ranged downloads, ETag, sha256 headers."""
from __future__ import annotations

import base64
import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from svdforge.api.main import create_app
from svdforge.persistence.keys import create_key
from svdforge.persistence.storage import make_storage
from svdforge.worker.runner import JobRunner

from .conftest import TINY_REQUEST_OPTIONS, fresh_database, make_settings
from .test_api_jobs import assert_problem


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model_root):
    """One succeeded job on the tiny model, shared by the tests of this module."""
    settings = make_settings(tmp_path_factory.mktemp("artifacts"), model_root=tiny_model_root)
    db = fresh_database(settings)
    with db.begin() as s:
        _, alice = create_key(s, "alice")
        _, bob = create_key(s, "bob")
    app = create_app(settings)
    with TestClient(app) as client:
        auth = {"Authorization": f"Bearer {alice}"}
        body = {"model": str(tiny_model_root / "tiny"), "ratio": 0.4, **TINY_REQUEST_OPTIONS}
        body["evaluation"] = {**body["evaluation"], "prompts": ["Hello there"], "sample_tokens": 4}
        job = client.post("/v1/jobs", json=body, headers=auth).json()
        status = JobRunner(db, make_storage(settings), settings).run(job["id"])
        assert status == "succeeded", client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        yield {"client": client, "auth": auth, "other": {"Authorization": f"Bearer {bob}"}, "job": job["id"],
               "settings": settings}
    db.dispose()


def _artifacts(done) -> dict[str, dict]:
    r = done["client"].get(f"/v1/jobs/{done['job']}/artifacts", headers=done["auth"])
    assert r.status_code == 200
    return {a["name"]: a for a in r.json()["data"]}


def test_job_shows_stages_timings_and_success(done):
    job = done["client"].get(f"/v1/jobs/{done['job']}", headers=done["auth"]).json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    stages = {s["name"]: s for s in job["stages"]}
    for name in ("whiten", "svd", "evaluate", "upload"):
        assert stages[name]["status"] == "completed" and stages[name]["seconds"] > 0, stages[name]
    assert stages["recover"]["status"] == "skipped"
    events = done["client"].get(f"/v1/jobs/{done['job']}/events", params={"limit": 1000},
                                headers=done["auth"]).json()["data"]
    kinds = {(e["type"], e["stage"]) for e in events}
    assert {("stage_started", "whiten"), ("stage_finished", "svd"), ("metrics", "evaluate")} <= kinds
    assert events[-1]["data"]["to"] == "succeeded"


def test_artifacts_listed_with_sha256(done):
    arts = _artifacts(done)
    assert {"model.safetensors", "config.json", "svdforge.json", "report.json", "samples.md"} <= set(arts)
    assert arts["samples.md"]["content_type"] == "text/markdown; charset=utf-8"
    manifest = json.loads(done["client"].get(arts["svdforge.json"]["content_url"], headers=done["auth"]).content)
    for name, meta in manifest["files"].items():  # the service's sha256 agrees with core's manifest
        assert arts[name]["sha256"] == meta["sha256"]
    a = arts["model.safetensors"]
    assert a["download_url"] is None and a["download_url_expires_at"] is None  # local storage cannot presign
    one = done["client"].get(f"/v1/jobs/{done['job']}/artifacts/{a['id']}", headers=done["auth"]).json()
    assert one == a


def test_download_full_file_matches_sha256(done):
    a = _artifacts(done)["model.safetensors"]
    r = done["client"].get(a["content_url"], headers=done["auth"])
    assert r.status_code == 200 and len(r.content) == a["bytes"]
    digest = hashlib.sha256(r.content).hexdigest()
    assert digest == a["sha256"] == r.headers["x-content-sha256"]
    assert r.headers["etag"] == f'"{digest}"' and r.headers["accept-ranges"] == "bytes"
    assert r.headers["repr-digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:"
    assert r.headers["content-disposition"] == 'attachment; filename="model.safetensors"'
    from safetensors.torch import load

    assert len(load(r.content)) > 0  # a real safetensors file


def test_ranges(done):
    a = _artifacts(done)["model.safetensors"]
    c, h = done["client"], done["auth"]
    full = c.get(a["content_url"], headers=h).content
    size = len(full)
    cases = {"bytes=0-99": (0, 99), "bytes=100-": (100, size - 1), "bytes=-10": (size - 10, size - 1),
             f"bytes=5-{size + 50}": (5, size - 1)}
    for header, (start, end) in cases.items():
        r = c.get(a["content_url"], headers={**h, "Range": header})
        assert r.status_code == 206, header
        assert r.content == full[start:end + 1]
        assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert r.headers["x-content-sha256"] == a["sha256"]  # always the whole file's hash
    r = c.get(a["content_url"], headers={**h, "Range": f"bytes={size}-"})
    assert_problem(r, 416, "range_not_satisfiable")
    assert r.headers["content-range"] == f"bytes */{size}"
    assert c.get(a["content_url"], headers={**h, "Range": "bytes=0-1,4-5"}).status_code == 200  # ignored
    assert c.get(a["content_url"], headers={**h, "Range": "lines=1-2"}).status_code == 200
    stale = c.get(a["content_url"], headers={**h, "Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and len(stale.content) == size
    fresh = c.get(a["content_url"], headers={**h, "Range": "bytes=0-9", "If-Range": f'"{a["sha256"]}"'})
    assert fresh.status_code == 206 and fresh.content == full[:10]
    cached = c.get(a["content_url"], headers={**h, "If-None-Match": f'"{a["sha256"]}"'})
    assert cached.status_code == 304 and cached.content == b""


def test_report(done):
    r = done["client"].get(f"/v1/jobs/{done['job']}/report", headers=done["auth"])
    assert r.status_code == 200
    report = r.json()
    assert report["object"] == "job.report" and report["job_id"] == done["job"]
    assert report["metrics"]["dense"]["ppl"] > 0 and report["metrics"]["compressed"]["ppl"] > 0
    assert report["params"]["compressed"] < report["params"]["dense"]
    assert "ranks" in report and "timings_s" in report
    samples = report["samples"]   # the request's prompt after the fixed ones, at its token count
    assert samples["max_new_tokens"] == 4 and samples["items"][-1]["prompt"] == "Hello there"
    assert [i["source"] for i in samples["items"]][-2:] == ["fixed", "request"]
    assert all({"dense", "compressed"} <= set(i) for i in samples["items"])


def test_other_key_sees_nothing(done):
    a = _artifacts(done)["model.safetensors"]
    c, other = done["client"], done["other"]
    for path in (f"/v1/jobs/{done['job']}/artifacts", f"/v1/jobs/{done['job']}/artifacts/{a['id']}",
                 a["content_url"], f"/v1/jobs/{done['job']}/report"):
        assert_problem(c.get(path, headers=other), 404)
    assert_problem(c.get(f"/v1/jobs/{done['job']}/artifacts/art_nope", headers=done["auth"]), 404)


def test_finished_job_cannot_be_cancelled(done):
    r = done["client"].post(f"/v1/jobs/{done['job']}/cancel", headers=done["auth"])
    assert_problem(r, 409, "job_finished")

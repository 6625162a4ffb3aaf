"""Sweep jobs through the service: `ratios` validation (422 naming the field), the request
mapping to core's SweepConfig, and a real sweep job on the tiny model (in-process runner):
one artifact folder per ratio, per-ratio metrics in the report, the PPL-vs-ratio figure
listed, linked and downloadable like every other artifact."""
from __future__ import annotations

import hashlib
import json

import pytest
from fastapi.testclient import TestClient

from svdforge.api.main import create_app
from svdforge.core.config import CompressConfig, SweepConfig
from svdforge.persistence.keys import create_key
from svdforge.persistence.storage import make_storage
from svdforge.persistence.tables import Job
from svdforge.worker.config import build_config
from svdforge.worker.runner import JobRunner

from .conftest import TINY_REQUEST_OPTIONS, fresh_database, make_settings
from .test_api_jobs import assert_problem, queued_messages

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("body", "field", "needle"), [
    ({"model": "smollm2-135m"}, "ratio", "`ratios`"),
    ({"model": "smollm2-135m", "ratio": 0.4, "ratios": [0.2, 0.6]}, "ratios", "not both"),
    ({"model": "smollm2-135m", "ratios": [0.4]}, "ratios", "at least 2"),
    ({"model": "smollm2-135m", "ratios": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}, "ratios", "at most 8"),
    ({"model": "smollm2-135m", "ratios": [0.2, 0.2]}, "ratios", "distinct"),
    ({"model": "smollm2-135m", "ratios": [0.2, 1.0]}, "ratios[1]", "less than 1"),
    ({"model": "smollm2-135m", "ratios": [0.2, "0.4"]}, "ratios[1]", ""),
    ({"model": "smollm2-135m", "ratios": 0.4}, "ratios", ""),
    ({"model": "smollm2-135m", "ratios": [0.2, 0.4], "adapter": {"type": "update"}}, "adapter.type", "sequential"),
])
def test_ratio_or_ratios_validation(client, auth, settings, body, field, needle):
    r = client.post("/v1/jobs", json=body, headers=auth)
    problem = assert_problem(r, 422, "validation_error", field)
    assert needle in problem["detail"]
    assert queued_messages(settings) == []


def test_a_sweep_request_is_accepted_and_maps_to_a_parallel_sweep(client, auth, settings, db):
    r = client.post("/v1/jobs", json={"model": "smollm2-135m", "ratios": [0.6, 0.2, 0.4]}, headers=auth)
    assert r.status_code == 201, r.text
    request = r.json()["request"]
    assert request["ratios"] == [0.6, 0.2, 0.4] and request["ratio"] is None
    with db.session() as s:   # stored without the unused field: single-ratio requests hash as before
        stored = s.get(Job, r.json()["id"]).request
        assert "ratio" not in stored and stored["ratios"] == [0.6, 0.2, 0.4]
    cfg = build_config(stored, {}, settings)
    assert isinstance(cfg, SweepConfig) and cfg.ratios == [0.2, 0.4, 0.6]
    assert cfg.config.calibration_mode == "parallel"
    job_id = client.post("/v1/jobs", json={"model": "smollm2-135m", "ratio": 0.4}, headers=auth).json()["id"]
    with db.session() as s:
        stored = s.get(Job, job_id).request
        assert "ratios" not in stored and stored["ratio"] == 0.4
    single = build_config(stored, {}, settings)
    assert isinstance(single, CompressConfig) and single.calibration_mode == "sequential"


@pytest.fixture(scope="module")
def sweep_job(tmp_path_factory, tiny_model_root):
    settings = make_settings(tmp_path_factory.mktemp("sweep"), model_root=tiny_model_root)
    db = fresh_database(settings)
    with db.begin() as s:
        _, token = create_key(s, "alice")
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {token}"}
        body = {"model": str(tiny_model_root / "tiny"), "ratios": [0.2, 0.5], **TINY_REQUEST_OPTIONS}
        job = client.post("/v1/jobs", json=body, headers=auth).json()
        status = JobRunner(db, make_storage(settings), settings).run(job["id"])
        assert status == "succeeded", client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        yield client, auth, job["id"]
    db.dispose()


def test_a_sweep_job_has_one_artifact_per_ratio(sweep_job):
    client, auth, job_id = sweep_job
    arts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]}
    for folder in ("ratio-0.20", "ratio-0.50"):
        assert {f"{folder}/{n}" for n in ("model.safetensors", "config.json", "svdforge.json", "report.json",
                                         "ranks.png", "metrics.png")} <= set(arts)
        manifest = json.loads(client.get(arts[f"{folder}/svdforge.json"]["content_url"], headers=auth).content)
        for name, meta in manifest["files"].items():     # the service's sha256 agrees with each manifest
            assert arts[f"{folder}/{name}"]["sha256"] == meta["sha256"]
        model = client.get(arts[f"{folder}/model.safetensors"]["content_url"], headers=auth)
        assert hashlib.sha256(model.content).hexdigest() == arts[f"{folder}/model.safetensors"]["sha256"]
        assert model.headers["content-disposition"] == 'attachment; filename="model.safetensors"'
    assert "model.safetensors" not in arts                 # no unqualified model: every one is per ratio
    sizes = [arts[f"ratio-0.{r}0/model.safetensors"]["bytes"] for r in (2, 5)]
    assert sizes[0] > sizes[1]


def test_a_sweep_report_has_per_ratio_metrics_and_the_figure(sweep_job):
    client, auth, job_id = sweep_job
    report = client.get(f"/v1/jobs/{job_id}/report", headers=auth).json()
    assert report["calibration_mode"] == "parallel" and report["target_ratios"] == [0.2, 0.5]
    entries = report["sweep"]["ratios"]
    assert [(e["ratio"], e["artifact"]) for e in entries] == [(0.2, "ratio-0.20"), (0.5, "ratio-0.50")]
    for e in entries:
        assert e["metrics"]["compressed"]["ppl"] > 1 and e["params"]["reduction"] > 0
    assert entries[0]["params"]["compressed"] > entries[1]["params"]["compressed"]
    time_s = report["sweep"]["time_s"]
    assert time_s["saved"]["calibrate_decompose"] > 0 and time_s["ratio_calibrate_decompose"] < 1
    link = report["figures"]["ppl_vs_ratio"]
    assert link["name"] == "ppl_vs_ratio.png" and "figures_error" not in report
    assert report["figures"]["ratio-0.20/ranks"]["name"] == "ratio-0.20/ranks.png"
    r = client.get(link["content_url"], headers=auth)
    assert r.status_code == 200 and r.content.startswith(PNG) and len(r.content) > 5000
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    stages = {s["name"]: s["status"] for s in job["stages"]}
    assert stages["whiten"] == stages["svd"] == stages["evaluate"] == stages["upload"] == "completed"

"""Quality-targeted jobs through the service: `target` validation (422 naming the field), the
request mapping to core's TargetedConfig, a real targeted job on the tiny model (in-process
runner: one artifact, the report's `target` curve), and a target no ratio meets (the job
fails with `target_unmet` and keeps no artifact)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from svdforge.api.main import create_app
from svdforge.core.config import TargetedConfig
from svdforge.persistence.keys import create_key
from svdforge.persistence.storage import make_storage
from svdforge.persistence.tables import Job
from svdforge.worker.config import build_config
from svdforge.worker.runner import JobRunner

from .conftest import TINY_REQUEST_OPTIONS, fresh_database, make_settings
from .test_api_jobs import assert_problem, queued_messages

M = {"model": "smollm2-135m"}


@pytest.mark.parametrize(("body", "field", "needle"), [
    (M | {"target": {}}, "target", "exactly one"),
    (M | {"target": {"max_ppl_ratio": 1.5, "max_teacher_kl": 0.5}}, "target", "exactly one"),
    (M | {"target": {"max_ppl_ratio": 0}}, "target.max_ppl_ratio", "greater than 0"),
    (M | {"target": {"max_teacher_kl": -0.1}}, "target.max_teacher_kl", "greater than 0"),
    (M | {"target": {"max_ppl_ratio": "1.5"}}, "target.max_ppl_ratio", ""),
    (M | {"target": {"max_ppl_ratio": 1.5, "budget": 1}}, "target.budget", ""),
    (M | {"target": {"max_ppl_ratio": 1.5, "ratio_min": 0.6, "ratio_max": 0.4}}, "target", "below"),
    (M | {"target": {"max_ppl_ratio": 1.5, "max_probes": 1}}, "target.max_probes", ""),
    (M | {"ratio": 0.4, "target": {"max_ppl_ratio": 1.5}}, "target", "not both"),
    (M | {"ratios": [0.2, 0.4], "target": {"max_ppl_ratio": 1.5}}, "target", "not both"),
    (M | {"target": {"max_ppl_ratio": 1.5}, "adapter": {"type": "lora"}}, "adapter.type", "without recovery"),
    (M | {"target": {"max_ppl_ratio": 1.5}, "evaluation": {"enabled": False}}, "evaluation.enabled", "enabled"),
    (M, "ratio", "`target`"),
])
def test_target_validation(client, auth, settings, body, field, needle):
    r = client.post("/v1/jobs", json=body, headers=auth)
    problem = assert_problem(r, 422, "validation_error", field)
    assert needle in problem["detail"]
    assert queued_messages(settings) == []


def test_non_finite_bounds_are_refused(client, auth):
    r = client.post("/v1/jobs", content=b'{"model": "smollm2-135m", "target": {"max_ppl_ratio": Infinity}}',
                    headers=auth | {"Content-Type": "application/json"})
    assert r.status_code in (400, 422) and "Traceback" not in r.text


def test_a_target_request_maps_to_a_parallel_targeted_config(client, auth, settings, db):
    r = client.post("/v1/jobs", json=M | {"target": {"max_teacher_kl": 0.8}}, headers=auth)
    assert r.status_code == 201, r.text
    request = r.json()["request"]
    assert request["target"]["max_teacher_kl"] == 0.8 and request["ratio"] is None and request["ratios"] is None
    with db.session() as s:
        stored = s.get(Job, r.json()["id"]).request
        assert "ratio" not in stored and "ratios" not in stored
    cfg = build_config(stored, {}, settings)
    assert isinstance(cfg, TargetedConfig) and cfg.config.calibration_mode == "parallel"
    assert cfg.target.metric == ("teacher_kl", 0.8) and cfg.target.ratio_max == 0.95
    job_id = client.post("/v1/jobs", json=M | {"ratio": 0.4}, headers=auth).json()["id"]
    with db.session() as s:
        assert "target" not in s.get(Job, job_id).request    # single-ratio requests store as before


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_root):
    settings = make_settings(tmp_path_factory.mktemp("target"), model_root=tiny_model_root)
    db = fresh_database(settings)
    with db.begin() as s:
        _, token = create_key(s, "alice")
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {token}"}

        def run(target: dict) -> tuple[str, str]:
            body = {"model": str(tiny_model_root / "tiny"), "target": target, **TINY_REQUEST_OPTIONS}
            job = client.post("/v1/jobs", json=body, headers=auth).json()
            return JobRunner(db, make_storage(settings), settings).run(job["id"]), job["id"]

        yield client, auth, run
    db.dispose()


def test_a_targeted_job_has_one_artifact_and_the_curve(service):
    client, auth, run = service
    status, job_id = run({"max_teacher_kl": 0.2, "tolerance": 0.2})
    assert status == "succeeded", client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    report = client.get(f"/v1/jobs/{job_id}/report", headers=auth).json()
    t = report["target"]
    assert t["metric"] == "teacher_kl" and t["chosen"] == report["target_ratio"] and len(t["probes"]) >= 3
    assert all(p["meets"] == (p["teacher_kl"] <= 0.2) for p in t["probes"])
    assert report["metrics"]["compressed"]["teacher_kl"] <= 0.2
    names = {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]}
    assert {"model.safetensors", "svdforge.json", "report.json"} <= names
    assert not any("/" in n for n in names)               # one artifact, not one per probe


def test_a_target_no_ratio_meets_fails_with_target_unmet(service):
    client, auth, run = service
    status, job_id = run({"max_teacher_kl": 1e-6})
    assert status == "failed"
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["error"]["code"] == "target_unmet" and "smallest ratio" in job["error"]["message"]
    assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"] == []

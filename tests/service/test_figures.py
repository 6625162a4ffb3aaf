"""Figures: core draws them from a report; every succeeded job stores them as artifacts
(ranks.png, metrics.png, and loss.png when it trained an adapter) and its report links them."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from svdforge.api.main import create_app
from svdforge.core.figures import render_figures
from svdforge.persistence.keys import create_key
from svdforge.persistence.storage import make_storage
from svdforge.worker.figures import link_figures, render_job_figures
from svdforge.worker.runner import JobRunner, Uploaded

from .conftest import TINY_REQUEST_OPTIONS, fresh_database, make_settings

PNG = b"\x89PNG\r\n\x1a\n"


def _report(layers: int = 3) -> dict:
    ranks = {}
    for layer in range(layers):
        for kind, (m, n, k) in {"q_proj": (64, 64, 19), "down_proj": (64, 128, 25)}.items():
            ranks[f"model.layers.{layer}.{kind}"] = {"shape": [m, n], "rank": k, "retained_energy": 0.8 + 0.05 * layer}
    ranks["model.layers.0.k_proj"] = {"shape": [8, 64], "rank": None, "dense_reason": "kept dense"}
    return {"model": "tiny", "method": "svd-llm", "target_ratio": 0.4, "ranks": ranks,
            "metrics": {"dense": {"ppl": 10.0}, "compressed": {"ppl": 12.5, "teacher_kl": 0.2,
                                                               "top10_recall": 0.8, "agreement": 70.0}},
            "recover": {"type": "lora", "loss_curve": [[1, 3.0], [2, 2.5], [4, 2.1]]}}


def test_core_renders_the_three_figures(tmp_path):
    assert render_figures(_report(), tmp_path) == {"ranks": "ranks.png", "metrics": "metrics.png", "loss": "loss.png"}
    for name in ("ranks", "metrics", "loss"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def test_only_what_the_report_has_data_for(tmp_path):
    assert render_figures({"metrics": {"compressed": {"ppl": 3.0}}}, tmp_path) == {}  # no dense PPL, no ranks
    report = _report()
    del report["recover"]
    report["metrics"]["compressed"]["teacher_kl"] = float("nan")  # drawn as n/a, not a failure
    assert set(render_figures(report, tmp_path / "b")) == {"ranks", "metrics"}
    assert not (tmp_path / "b" / "loss.png").exists()


def test_a_broken_report_never_fails_the_job(tmp_path):
    figures, error = render_job_figures({"ranks": {"model.layers.0.q_proj": {"rank": "x"}}}, tmp_path)
    assert figures == {} and error and "ValueError" in error
    assert list(tmp_path.glob("*.png")) == []
    u = Uploaded("model.safetensors", "k", 1, "0" * 64, "application/octet-stream")
    assert link_figures({"a": 1}, "job_x", {}, error, [u]) == {"a": 1, "figures": {}, "figures_error": error}
    assert link_figures({"a": 1}, "job_x", {}, None, [u]) == {"a": 1}


@pytest.fixture(scope="module")
def recovered_job(tmp_path_factory, tiny_model_root):
    """A real LoRA-recovery job on the tiny model, run in process."""
    settings = make_settings(tmp_path_factory.mktemp("figures"), model_root=tiny_model_root)
    db = fresh_database(settings)
    with db.begin() as s:
        _, token = create_key(s, "alice")
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {token}"}
        body = {"model": str(tiny_model_root / "tiny"), "ratio": 0.4, **TINY_REQUEST_OPTIONS,
                "adapter": {"type": "lora", "rank": 4, "max_steps": 4,
                            "data": {"source": "builtin", "samples": 4, "seq_len": 32}}}
        job = client.post("/v1/jobs", json=body, headers=auth).json()
        status = JobRunner(db, make_storage(settings), settings).run(job["id"])
        assert status == "succeeded", client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        yield client, auth, job["id"]
    db.dispose()


def test_a_job_stores_and_links_its_figures(recovered_job):
    client, auth, job_id = recovered_job
    arts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]}
    assert {"ranks.png", "metrics.png", "loss.png", "model.safetensors"} <= set(arts)
    report = client.get(f"/v1/jobs/{job_id}/report", headers=auth).json()
    assert set(report["figures"]) == {"ranks", "metrics", "loss"} and "figures_error" not in report
    for figure, link in report["figures"].items():
        a = arts[f"{figure}.png"]
        assert link == {"name": a["name"], "artifact_id": a["id"],
                        "content_url": f"/v1/jobs/{job_id}/artifacts/{a['id']}/content"}
        assert a["content_type"] == "image/png"
        r = client.get(link["content_url"], headers=auth)
        assert r.status_code == 200 and r.content.startswith(PNG) and len(r.content) == a["bytes"] > 5000

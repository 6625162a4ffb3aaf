"""The jobs API: creation, validation, idempotency, auth, pagination, cancel, events, errors."""
from __future__ import annotations

import base64
import json
import os

import pytest
from sqlalchemy import select

from svdforge.core.config import EvalConfig, RecoverConfig
from svdforge.persistence.state import JobStatus, transition
from svdforge.persistence.tables import Job

PROBLEM = "application/problem+json"
MINIMAL = {"model": "smollm2-135m", "ratio": 0.4}
FULL = {"model": "smollm2-135m", "ratio": 0.4, "method": "svd-llm", "allocation": "uniform",
        "adapter": {"type": "lora", "rank": 8}, "calibration": {"source": "builtin", "samples": 64, "seq_len": 512},
        "evaluation": {"source": "builtin", "max_tokens": 16384}, "metadata": {"team": "search"}}


def assert_problem(r, status: int, code: str | None = None, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("urn:svdforge:problem:")
    assert "Traceback" not in r.text
    if code:
        assert body["code"] == code
    if field:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def queued_messages(settings) -> list[dict]:
    out = []
    for name in sorted(os.listdir(settings.queue_dir)):
        if name.endswith(".gpu.msg"):
            out.append(json.loads((settings.queue_dir / name).read_text()))
    return out


def test_create_minimal_job_has_explicit_defaults(client, auth, settings, db):
    r = client.post("/v1/jobs", json=MINIMAL, headers=auth)
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert job["object"] == "job" and job["status"] == "queued" and job["attempt"] == 0
    assert job["request"]["calibration"] == {"source": "builtin", "samples": 16, "seq_len": 256, "seed": 0}
    assert job["request"]["evaluation"]["max_tokens"] == EvalConfig().max_tokens  # core's default
    assert job["request"]["evaluation"]["seq_len"] == 256
    assert job["request"]["evaluation"]["prompts"] == [] and job["request"]["evaluation"]["sample_tokens"] == 32
    assert job["request"]["method"] == "svd-llm" and job["request"]["adapter"] == {"type": "none"}
    assert [s["name"] for s in job["stages"]] == ["load", "whiten", "svd", "recover", "evaluate", "upload"]
    assert {s["name"]: s["status"] for s in job["stages"]}["recover"] == "skipped"
    # enqueued after commit: the message carries only the id, and the row says it was sent
    messages = queued_messages(settings)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "svdforge.run_job"
    assert messages[0]["properties"]["body_encoding"] == "base64"
    args, kwargs, _ = json.loads(base64.b64decode(messages[0]["body"]))
    assert args == [job["id"]] and kwargs == {}
    with db.session() as s:
        assert s.get(Job, job["id"]).enqueued_at is not None


def test_create_full_example_request(client, auth):
    r = client.post("/v1/jobs", json=FULL, headers=auth)
    assert r.status_code == 201, r.text
    req = r.json()["request"]
    assert req["adapter"]["type"] == "lora" and req["adapter"]["rank"] == 8 and req["adapter"]["alpha"] == 16
    train = RecoverConfig().data  # the training text left out: core's default, stored explicitly
    assert req["adapter"]["data"] == {"source": "builtin", "samples": train.samples, "seq_len": train.seq_len,
                                      "seed": train.seed}
    assert req["calibration"]["samples"] == 64 and req["evaluation"]["max_tokens"] == 16384
    assert r.json()["metadata"] == {"team": "search"}
    assert {s["name"]: s["status"] for s in r.json()["stages"]}["recover"] == "pending"


def test_rank_multiple_is_stored_and_reaches_core(client, auth, settings):
    from svdforge.worker.config import build_config

    minimal = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["request"]
    assert minimal["rank_multiple"] == 1 and build_config(minimal, {}, settings).rank_multiple == 1
    r = client.post("/v1/jobs", json={**MINIMAL, "rank_multiple": 64}, headers=auth)
    assert r.status_code == 201, r.text
    assert build_config(r.json()["request"], {}, settings).rank_multiple == 64


@pytest.mark.parametrize(("patch", "field"), [
    ({"ratio": 1.0}, "ratio"),
    ({"ratio": 0}, "ratio"),
    ({"ratio": "lots"}, "ratio"),
    ({"method": "pca"}, "method"),
    ({"allocation": "random"}, "allocation"),
    ({"colour": "blue"}, "colour"),
    ({"adapter": {"type": "lora", "rank": 0}}, "adapter.rank"),
    ({"adapter": {"type": "lora", "rnak": 4}}, "adapter.rnak"),
    ({"adapter": {"type": "qlora"}}, "adapter"),
    ({"adapter": {"type": "adalora", "init_r": 4, "target_r": 8}}, "adapter"),
    ({"adapter": {"type": "lora", "lr": 2}}, "adapter.lr"),
    ({"adapter": {"type": "update", "lr": 1e-4}}, "adapter.lr"),   # a closed-form update does not train
    ({"adapter": {"type": "update", "mix": 1.5}}, "adapter.mix"),
    ({"adapter": {"type": "lora", "update_mix": -1}}, "adapter.update_mix"),
    ({"calibration": {"source": "builtin", "samples": 0}}, "calibration.samples"),
    ({"calibration": {"source": "builtin", "seq_len": 100000}}, "calibration.seq_len"),
    ({"calibration": {"source": "file"}}, "calibration.file_id"),
    ({"calibration": {"source": "hf", "dataset": "../etc"}}, "calibration.dataset"),
    ({"evaluation": {"source": "builtin", "seq_len": 512, "max_tokens": 256}}, "evaluation"),
    ({"evaluation": {"source": "builtin", "prompts": ["Hello"] * 9}}, "evaluation.prompts"),
    ({"evaluation": {"prompts": ["Hello", ""]}}, "evaluation.prompts[1]"),
    ({"evaluation": {"prompts": ["x" * 1001]}}, "evaluation.prompts[0]"),
    ({"evaluation": {"sample_tokens": 0}}, "evaluation.sample_tokens"),
    ({"evaluation": {"sample_tokens": 257}}, "evaluation.sample_tokens"),
    ({"refine": {"passes": 0}}, "refine.passes"),
    ({"refine": {"passes": 2, "lr": 1}}, "refine.lr"),
    ({"refine": {"norms": "yes"}}, "refine.norms"),
    ({"refine": {"pases": 2}}, "refine.pases"),
    ({"ratio": None, "ratios": [0.2, 0.4], "refine": {"passes": 2}}, "refine"),
    ({"rank_multiple": 0}, "rank_multiple"),
    ({"rank_multiple": 1025}, "rank_multiple"),
    ({"rank_multiple": 8.5}, "rank_multiple"),
    ({"rank_multiple": "8"}, "rank_multiple"),
    ({"metadata": {"k": "x" * 600}}, "metadata.k"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"model": ""}, "model"),
])
def test_validation_errors_name_the_field(client, auth, settings, patch, field):
    r = client.post("/v1/jobs", json={**MINIMAL, **patch}, headers=auth)
    body = assert_problem(r, 422, "validation_error", field)
    assert field in body["detail"]
    assert queued_messages(settings) == []  # nothing accepted, nothing queued


def test_malformed_json_and_missing_fields(client, auth):
    r = client.post("/v1/jobs", content=b"{not json", headers={**auth, "content-type": "application/json"})
    assert_problem(r, 422, "validation_error")
    assert_problem(client.post("/v1/jobs", json={"ratio": 0.4}, headers=auth), 422, field="model")
    assert_problem(client.post("/v1/jobs", json=[1, 2], headers=auth), 422)


@pytest.mark.parametrize(("model", "message"), [
    ("/etc/passwd", "outside the allowed model root"),
    ("{root}/../../etc", "outside the allowed model root"),
    ("{root}/missing", "no such model"),
    ("relative/../../x", "is not an alias"),
    ("./tiny", "must be absolute"),
    ("no spaces allowed", "is not an alias"),
])
def test_model_references_are_checked(client, auth, settings, model, message):
    model = model.format(root=settings.model_root)
    body = assert_problem(client.post("/v1/jobs", json={**MINIMAL, "model": model}, headers=auth), 422, field="model")
    assert message in body["detail"]


def test_symlink_out_of_model_root_is_refused(client, auth, settings, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (settings.model_root / "sneaky").symlink_to(outside)
    r = client.post("/v1/jobs", json={**MINIMAL, "model": str(settings.model_root / "sneaky")}, headers=auth)
    assert_problem(r, 422, field="model")


def test_model_path_inside_root_and_hub_ids(client, auth, settings):
    (settings.model_root / "m").mkdir()
    assert client.post("/v1/jobs", json={**MINIMAL, "model": str(settings.model_root / "m")},
                       headers=auth).status_code == 201
    assert client.post("/v1/jobs", json={**MINIMAL, "model": "HuggingFaceTB/SmolLM2-135M"},
                       headers=auth).status_code == 201


def test_local_paths_disabled_without_root(tmp_path, db, auth):
    from fastapi.testclient import TestClient

    from svdforge.api.main import create_app

    from .conftest import make_settings

    app = create_app(make_settings(tmp_path, model_root=None, data_dir=db.settings.data_dir))
    with TestClient(app) as c:
        body = assert_problem(c.post("/v1/jobs", json={**MINIMAL, "model": "/models/x"}, headers=auth), 422)
    assert "disabled" in body["detail"]


def test_idempotency_key(client, auth, other_auth, settings):
    h = {**auth, "Idempotency-Key": "abc-123"}
    first = client.post("/v1/jobs", json=MINIMAL, headers=h)
    again = client.post("/v1/jobs", json=dict(reversed(list(MINIMAL.items()))), headers=h)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert len(queued_messages(settings)) == 1  # the replay did not enqueue twice
    # defaults count as the same body
    same = client.post("/v1/jobs", json={**MINIMAL, "method": "svd-llm"}, headers=h)
    assert same.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={**MINIMAL, "ratio": 0.5}, headers=h)
    body = assert_problem(other, 422, "idempotency_key_reused")
    assert body["job_id"] == first.json()["id"]
    # keys are scoped to the API key that used them
    bob = client.post("/v1/jobs", json=MINIMAL, headers={**other_auth, "Idempotency-Key": "abc-123"})
    assert bob.status_code == 201 and bob.json()["id"] != first.json()["id"]
    assert_problem(client.post("/v1/jobs", json=MINIMAL, headers={**auth, "Idempotency-Key": "x" * 300}), 422)


def test_broker_down_keeps_the_job_and_replay_enqueues_it(client, auth, app, settings, db):
    """A failed enqueue loses nothing: the job stays queued (enqueued_at empty) until it is sent."""
    from svdforge.persistence.queue import make_celery

    good = app.state.celery
    app.state.celery = make_celery(settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"}))
    h = {**auth, "Idempotency-Key": "k1"}
    r = client.post("/v1/jobs", json=MINIMAL, headers=h)
    assert r.status_code == 201
    with db.session() as s:
        assert s.get(Job, r.json()["id"]).enqueued_at is None
    assert queued_messages(settings) == []
    app.state.celery = good
    again = client.post("/v1/jobs", json=MINIMAL, headers=h)
    assert again.json()["id"] == r.json()["id"]
    assert len(queued_messages(settings)) == 1
    with db.session() as s:
        assert s.get(Job, r.json()["id"]).enqueued_at is not None


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer svdf_" + "a" * 43}])
def test_missing_or_bad_key_is_401(client, headers):
    r = client.get("/v1/jobs", headers=headers)
    assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_401(client, auth, db):
    from svdforge.persistence.keys import find_key, revoke_key

    token = auth["Authorization"].split()[1]
    assert client.get("/v1/jobs", headers=auth).status_code == 200
    with db.begin() as s:
        revoke_key(s, find_key(s, token).id)
    assert_problem(client.get("/v1/jobs", headers=auth), 401)


def test_other_keys_jobs_are_404(client, auth, other_auth):
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/report",
                 f"/v1/jobs/{job_id}/artifacts", f"/v1/jobs/{job_id}/artifacts/art_x",
                 f"/v1/jobs/{job_id}/artifacts/art_x/content"):
        assert_problem(client.get(path, headers=other_auth), 404, "not_found")
    assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=other_auth), 404)
    assert client.get("/v1/jobs", headers=other_auth).json()["data"] == []
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200


def test_list_pagination_newest_first(client, auth):
    ids = [client.post("/v1/jobs", json={**MINIMAL, "metadata": {"n": str(i)}}, headers=auth).json()["id"]
           for i in range(5)]
    page1 = client.get("/v1/jobs", params={"limit": 2}, headers=auth).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"] is True
    assert page1["first_id"] == ids[4] and page1["last_id"] == ids[3]
    page2 = client.get("/v1/jobs", params={"limit": 2, "after": page1["last_id"]}, headers=auth).json()
    assert [j["id"] for j in page2["data"]] == [ids[2], ids[1]] and page2["has_more"] is True
    page3 = client.get("/v1/jobs", params={"limit": 2, "after": page2["last_id"]}, headers=auth).json()
    assert [j["id"] for j in page3["data"]] == [ids[0]] and page3["has_more"] is False
    assert_problem(client.get("/v1/jobs", params={"limit": 0}, headers=auth), 422, field="limit")
    assert_problem(client.get("/v1/jobs", params={"limit": 101}, headers=auth), 422, field="limit")
    assert_problem(client.get("/v1/jobs", params={"status": "exploded"}, headers=auth), 422, field="status")


@pytest.mark.parametrize("after", ["garbage", "job_", "job_x", "file_01m8tqeengrrm2jrwfp27v",
                                   "JOB_01M8TQEENGRRM2JRWFP27V", "job_01m8tqeengrrm2jrwfp27",
                                   "job_01m8tqeengrrm2jrwfp27u"])
def test_a_malformed_cursor_is_a_422_naming_after(client, auth, after):
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    for url in ("/v1/jobs", f"/v1/jobs/{job_id}/artifacts"):
        body = assert_problem(client.get(url, params={"after": after}, headers=auth), 422, "validation_error", "after")
        assert "last_id" in body["detail"]
    # a well-formed id of the right kind is a cursor, whether or not it exists
    assert client.get("/v1/jobs", params={"after": "job_zzzzzzzzzzzzzzzzzzzzzz"}, headers=auth).json()["data"]
    r = client.get(f"/v1/jobs/{job_id}/artifacts", params={"after": "art_01m8tqeengrrm2jrwfp27v"}, headers=auth)
    assert r.status_code == 200 and r.json()["data"] == []


def test_list_filters_by_status(client, auth):
    a = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    b = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    client.post(f"/v1/jobs/{a}/cancel", headers=auth)
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled", headers=auth).json()["data"]] == [a]
    assert [j["id"] for j in client.get("/v1/jobs?status=queued", headers=auth).json()["data"]] == [b]


def test_get_unknown_job_is_404(client, auth):
    assert_problem(client.get("/v1/jobs/job_missing", headers=auth), 404, "not_found")


def test_cancel_queued_job_is_immediate_then_409(client, auth):
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["cancel_requested_at"] and r.json()["finished_at"]
    body = assert_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=auth), 409, "job_finished")
    assert body["status_now"] == "cancelled"


def test_cancel_running_job_asks_the_worker(client, auth, db):
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    with db.begin() as s:
        transition(s, s.get(Job, job_id), JobStatus.RUNNING, worker_id="w", lease_s=60)
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    assert r.json()["status"] == "cancelling"
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)  # harmless twice
    assert again.status_code == 200 and again.json()["status"] == "cancelling"


def test_events_are_an_ordered_log_with_a_cursor(client, auth, db):
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    with db.begin() as s:
        transition(s, s.get(Job, job_id), JobStatus.RUNNING, worker_id="w", lease_s=60)
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    events = client.get(f"/v1/jobs/{job_id}/events", headers=auth).json()
    assert [(e["type"], e["data"]["to"]) for e in events["data"]] == [
        ("status", "queued"), ("status", "running"), ("status", "cancelling")]
    first = events["data"][0]["id"]
    rest = client.get(f"/v1/jobs/{job_id}/events", params={"after": first, "limit": 1}, headers=auth).json()
    assert [e["id"] for e in rest["data"]] == [events["data"][1]["id"]] and rest["has_more"] is True
    assert_problem(client.get(f"/v1/jobs/{job_id}/events", params={"after": "nope"}, headers=auth), 422,
                   field="after")


def test_report_before_success_is_409(client, auth):
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    body = assert_problem(client.get(f"/v1/jobs/{job_id}/report", headers=auth), 409, "report_not_ready")
    assert body["status_now"] == "queued"
    assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json() == {
        "object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_unknown_route_and_method_are_problems(client, auth):
    assert_problem(client.get("/v1/nothing", headers=auth), 404)
    r = client.delete("/v1/jobs", headers=auth)
    assert_problem(r, 405)
    assert r.headers["allow"] == "GET, POST"  # the methods the path serves (RFC 9110)
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=auth).json()["id"]
    assert client.put(f"/v1/jobs/{job_id}/cancel", headers=auth).headers["allow"] == "POST"


def test_oversized_body_is_413(client, auth, settings):
    r = client.post("/v1/jobs", content=b'{"model": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                    headers={**auth, "content-type": "application/json"})
    assert_problem(r, 413, "content_too_large")
    assert queued_messages(settings) == []


def test_health_and_readiness(client, app):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readiness_reports_what_is_down(client, app, settings):
    from svdforge.persistence.queue import make_celery

    app.state.celery = make_celery(settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"}))
    r = client.get("/readyz")
    body = assert_problem(r, 503, "unavailable")
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"].startswith("failed")


def test_job_rows_are_committed_before_enqueue(client, auth, app, db, settings):
    """The task must never see a job id that is not in the database yet."""
    seen = []

    class Spy:
        def send_task(self, name, args, **kwargs):
            with db.session() as s:  # another connection: only committed rows are visible
                seen.append(s.scalar(select(Job.status).where(Job.id == args[0])))

    app.state.celery = Spy()
    client.post("/v1/jobs", json=MINIMAL, headers=auth)
    assert seen == ["queued"]


@pytest.mark.parametrize(("content", "content_type"), [
    (json.dumps(MINIMAL), "text/plain"),
    ("model=smollm2-135m&ratio=0.4", "application/x-www-form-urlencoded"),
    ('--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nx\r\n--b--\r\n', "multipart/form-data; boundary=b"),
    (json.dumps(MINIMAL), None),
])
def test_a_body_that_is_not_json_is_a_415(client, auth, settings, content, content_type):
    headers = {**auth, **({"content-type": content_type} if content_type else {})}
    r = client.post("/v1/jobs", content=content.encode(), headers=headers)
    body = assert_problem(r, 415, "unsupported_media_type")
    assert "application/json" in body["detail"] and body["expected"] == "application/json"
    assert queued_messages(settings) == []
    # the same body as JSON (a charset or a +json subtype too) is accepted
    for ok in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = client.post("/v1/jobs", content=json.dumps(MINIMAL), headers={**auth, "content-type": ok})
        assert r.status_code == 201, r.text


def test_every_json_body_route_parses_strictly_and_documents_415(app):
    from fastapi.params import Form
    from fastapi.routing import APIRoute

    from svdforge.api.json_body import JsonRoute
    from svdforge.api.routes import files, health, jobs

    spec = app.openapi()["paths"]
    routes = [(r, prefix) for router, prefix in ((jobs.router, "/v1"), (files.router, "/v1"), (health.router, ""))
              for r in router.routes]
    bodies = [(r, prefix) for r, prefix in routes if isinstance(r, APIRoute) and r.body_field is not None
              and not isinstance(r.body_field.field_info, Form)]
    assert [r.name for r, _ in bodies] == ["create_job"]
    for route, prefix in bodies:
        assert isinstance(route, JsonRoute), route.name
        op = next(iter(spec[prefix + route.path_format][m.lower()] for m in route.methods))
        assert "application/problem+json" in op["responses"]["415"]["content"]


@pytest.mark.parametrize(("raw", "message"), [
    ('{"model": "smollm2-135m", "ratio": NaN}', "NaN is not valid JSON"),
    ('{"model": "smollm2-135m", "ratio": Infinity}', "Infinity is not valid JSON"),
    ('{"model": "smollm2-135m", "ratio": 0.4, "evaluation": {"max_tokens": -Infinity}}', "-Infinity is not valid"),
    ('{"model": "smollm2-135m", "ratio": 0.4, "ratio": 0.9}', 'duplicate key "ratio"'),
    ('{"model": "smollm2-135m", "ratio": 0.4, "evaluation": {"seq_len": 32, "seq_len": 64}}',
     'duplicate key "seq_len"'),
    ('{"model": "smollm2-135m", "ratio": 0.4, "metadata": {"a": "1", "a": "2"}}', 'duplicate key "a"'),
])
def test_non_rfc8259_json_is_refused_like_malformed_json(client, auth, settings, raw, message):
    r = client.post("/v1/jobs", content=raw, headers={**auth, "content-type": "application/json"})
    body = assert_problem(r, 422, "validation_error", "body")
    assert message in body["detail"] and body["errors"][0]["type"] == "json_invalid"
    assert queued_messages(settings) == []
    # malformed JSON has the same shape, and says where
    r = client.post("/v1/jobs", content=b'{"model": ', headers={**auth, "content-type": "application/json"})
    bad = assert_problem(r, 422, "validation_error", "body")
    assert bad["errors"][0]["type"] == "json_invalid" and "at character 10" in bad["errors"][0]["message"]
    # NaN inside a string and the same key in two objects are fine
    ok = '{"model": "smollm2-135m", "ratio": 0.4, "metadata": {"ratio": "NaN"}, "calibration": {"seq_len": 32}, ' \
         '"evaluation": {"seq_len": 32}}'
    assert client.post("/v1/jobs", content=ok, headers={**auth, "content-type": "application/json"}).status_code == 201


@pytest.mark.parametrize(("patch", "field"), [
    ({"evaluation": {"seq_len": 2048, "max_tokens": 4096}}, "evaluation.seq_len"),
    ({"calibration": {"seq_len": 1025}}, "calibration.seq_len"),
    ({"adapter": {"type": "lora", "data": {"seq_len": 4096}}}, "adapter.data.seq_len"),
])
def test_windows_longer_than_a_local_models_positions_are_refused(client, auth, settings, patch, field):
    d = settings.model_root / "short"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 1024}))
    (d / "model.safetensors").write_bytes(b"{}")
    body = assert_problem(client.post("/v1/jobs", json={**MINIMAL, "model": str(d), **patch}, headers=auth),
                          422, "validation_error", field)
    assert "1024 positions" in body["detail"] and "max_position_embeddings" in body["detail"]
    assert queued_messages(settings) == []
    # as long as the model allows is fine; a window the disabled evaluation would have used is not checked
    ok = {**MINIMAL, "model": str(d), "calibration": {"seq_len": 1024},
          "evaluation": {"enabled": False, "seq_len": 2048, "max_tokens": 4096}}
    assert client.post("/v1/jobs", json=ok, headers=auth).status_code == 201
    # a config without max_position_embeddings (GPT-2's n_positions is read too) leaves it to the worker
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert client.post("/v1/jobs", json={**MINIMAL, "model": str(d), **patch}, headers=auth).status_code == 201

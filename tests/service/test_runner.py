"""The worker's job runner with a stand-in pipeline: error mapping, cancellation, uploads,
redelivery and stale workers. (The real pipeline runs in test_artifacts.py and test_e2e.py.)"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from svdforge.api.schemas import JobCreate
from svdforge.core.config import REFINE_PASSES, UPDATE_MIX, CompressConfig, DataSpec, EvalConfig, RecoverConfig
from svdforge.core.errors import Cancelled, NumericalError, UserError
from svdforge.persistence.jobs import create_job
from svdforge.persistence.keys import create_key
from svdforge.persistence.state import JobStatus, transition
from svdforge.persistence.storage import LocalStorage, make_storage
from svdforge.persistence.tables import Artifact, File, Job, JobEvent, utcnow
from svdforge.worker.config import build_config
from svdforge.worker.runner import JobRunner


def new_job(db, **request) -> str:
    body = JobCreate(**{"model": "smollm2-135m", "ratio": 0.4, **request}).model_dump(mode="json")
    with db.begin() as s:
        key, _ = create_key(s, "k")
        return create_job(s, key.id, body).id


def write_artifact(out_dir: Path, files: dict[str, bytes]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    manifest = {"files": {n: {"sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    (out_dir / "svdforge.json").write_text(json.dumps(manifest))


FILES = {"model.safetensors": b"\x00" * 5000, "config.json": b"{}", "report.json": b'{"metrics": {}}'}


def ok_compress(config, out_dir, progress=None, should_cancel=None, **_hooks):
    for stage in ("load", "whiten", "svd"):
        progress({"type": "stage_started", "stage": stage, "fraction": 0.0, "message": ""})
        progress({"type": "progress", "stage": stage, "fraction": 0.5, "message": "layer 1/2"})
        progress({"type": "stage_finished", "stage": stage, "fraction": 1.0, "seconds": 0.25})
    progress({"type": "metrics", "stage": "evaluate", "metrics": {"compressed": {"ppl": float("nan")}}})
    write_artifact(Path(out_dir), FILES)
    return {"metrics": {"compressed": {"ppl": 12.5, "teacher_kl": float("inf")}}, "params": {"dense": 10}}


@pytest.fixture
def storage(settings):
    settings.ensure_dirs()
    return make_storage(settings)


def runner(db, storage, settings, compress, worker_id="w1") -> JobRunner:
    return JobRunner(db, storage, settings, compress=compress, worker_id=worker_id)


def job_row(db, job_id) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        _ = job.report
        return job


def events(db, job_id) -> list[JobEvent]:
    with db.session() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_success_uploads_then_succeeds(db, storage, settings):
    job_id = new_job(db)
    assert runner(db, storage, settings, ok_compress).run(job_id) == "succeeded"
    job = job_row(db, job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.progress == 1.0 and job.stage is None
    assert job.report["metrics"]["compressed"] == {"ppl": 12.5, "teacher_kl": None}  # strict JSON
    assert job.stages["whiten"]["status"] == "completed" and job.stages["whiten"]["seconds"] == 0.25
    assert job.stages["load"]["status"] == "completed"  # core's `load` is the job's first stage
    assert job.stages["upload"]["status"] == "completed"
    with db.session() as s:
        arts = {a.name: a for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    assert set(arts) == {*FILES, "svdforge.json"}
    for name, data in FILES.items():
        assert arts[name].sha256 == hashlib.sha256(data).hexdigest() and arts[name].bytes == len(data)
        assert b"".join(storage.open_range(arts[name].storage_key)) == data
    assert arts["config.json"].content_type == "application/json"
    types = [e.type for e in events(db, job_id)]
    assert types[:2] == ["status", "status"] and types[-1] == "status"
    assert {"stage_started", "stage_finished", "progress", "metrics"} <= set(types)
    assert not (settings.work_dir / job_id).exists()


def test_progress_writes_are_throttled(db, storage, settings):
    def chatty(config, out_dir, progress=None, should_cancel=None, **_hooks):
        progress({"type": "stage_started", "stage": "svd"})
        for i in range(2000):
            progress({"type": "progress", "stage": "svd", "fraction": i / 2000, "message": f"layer {i}"})
        progress({"type": "progress", "stage": "svd", "fraction": 1.0})
        write_artifact(Path(out_dir), FILES)
        return {}

    settings.progress_interval_s = 10.0
    job_id = new_job(db)
    assert runner(db, storage, settings, chatty).run(job_id) == "succeeded"
    progress = [e for e in events(db, job_id) if e.type == "progress" and e.stage == "svd"]
    assert 1 <= len(progress) <= 3  # coalesced, and the final fraction is kept
    assert progress[-1].data["fraction"] == 1.0


@pytest.mark.parametrize(("exc", "code", "message"), [
    (UserError("model 'x' is not a folder"), "invalid_input", "model 'x' is not a folder"),
    (NumericalError("non-finite Cholesky in layer 3"), "numerical_error", "non-finite Cholesky in layer 3"),
    (KeyError("boom"), "internal_error", "KeyError: 'boom'"),
])
def test_errors_fail_the_job_with_a_code(db, storage, settings, exc, code, message):
    def failing(config, out_dir, progress=None, should_cancel=None, **_hooks):
        progress({"type": "stage_started", "stage": "whiten"})
        progress({"type": "stage_started", "stage": "svd"})
        write_artifact(Path(out_dir), FILES)  # partial output must not survive
        raise exc

    job_id = new_job(db)
    assert runner(db, storage, settings, failing).run(job_id) == "failed"
    job = job_row(db, job_id)
    assert (job.error_code, job.error_message, job.error_stage) == (code, message, "svd")
    assert job.stages["svd"]["status"] == "failed"
    assert [e for e in events(db, job_id) if e.type == "error"][0].data == {"code": code}
    assert not (settings.storage_dir / "artifacts" / job_id).exists()
    assert not (settings.work_dir / job_id).exists()


def test_a_model_that_cannot_load_fails_in_the_load_stage(db, storage, settings):
    def unloadable(config, out_dir, progress=None, should_cancel=None, **_hooks):
        progress({"type": "stage_started", "stage": "load", "message": "loading model"})
        raise UserError("model 'x' is not a folder")

    job_id = new_job(db)
    assert runner(db, storage, settings, unloadable).run(job_id) == "failed"
    job = job_row(db, job_id)
    assert (job.error_code, job.error_stage, job.stages["load"]["status"]) == ("invalid_input", "load", "failed")
    assert [e.stage for e in events(db, job_id) if e.type == "stage_started"] == ["load"]


def _cancel_when_running(db, job_id, delay=0.0) -> threading.Thread:
    def go():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with db.begin() as s:
                job = s.get(Job, job_id)
                if job.status == "running":
                    time.sleep(delay)
                    transition(s, job, JobStatus.CANCELLING, message="cancel requested")
                    return
            time.sleep(0.01)

    t = threading.Thread(target=go)
    t.start()
    return t


def test_cancel_stops_at_a_layer_boundary(db, storage, settings):
    layers_done = []

    def slow(config, out_dir, progress=None, should_cancel=None, **_hooks):
        write_artifact(Path(out_dir), FILES)
        for layer in range(500):
            if should_cancel():
                raise Cancelled("cancelled by the caller")
            progress({"type": "progress", "stage": "svd", "fraction": layer / 500})
            layers_done.append(layer)
            time.sleep(0.01)
        return {}

    job_id = new_job(db)
    t = _cancel_when_running(db, job_id, delay=0.1)
    assert runner(db, storage, settings, slow).run(job_id) == "cancelled"
    t.join()
    assert len(layers_done) < 100  # stopped within a few monitor intervals, not at the end
    job = job_row(db, job_id)
    assert job.status == "cancelled" and job.error_code is None and job.finished_at
    assert not (settings.storage_dir / "artifacts" / job_id).exists()
    assert not (settings.work_dir / job_id).exists()


def test_cancel_during_upload_removes_uploaded_files(db, settings):
    settings.ensure_dirs()
    job_id = new_job(db)

    class CancellingStorage(LocalStorage):
        """Requests the cancel as soon as the first file is stored."""

        def put_file(self, key, path, **kw):
            super().put_file(key, path, **kw)
            with db.begin() as s:
                job = s.get(Job, job_id)
                if job.status == "running":
                    transition(s, job, JobStatus.CANCELLING)

    storage = CancellingStorage(settings.storage_dir)
    assert runner(db, storage, settings, ok_compress).run(job_id) == "cancelled"
    assert not (settings.storage_dir / "artifacts" / job_id).exists()
    with db.session() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []


def test_messages_for_jobs_not_queued_are_skipped(db, storage, settings):
    called = []

    def spy(*a, **k):
        called.append(1)
        return ok_compress(*a, **k)

    job_id = new_job(db)
    with db.begin() as s:
        transition(s, s.get(Job, job_id), JobStatus.CANCELLED)
    assert runner(db, storage, settings, spy).run(job_id) == "skipped"
    assert runner(db, storage, settings, spy).run("job_unknown") == "skipped"
    done = new_job(db)
    assert runner(db, storage, settings, spy).run(done) == "succeeded"
    assert runner(db, storage, settings, spy).run(done) == "skipped"  # a duplicate message
    assert len(called) == 1


def test_redelivery_after_an_expired_lease_runs_again(db, storage, settings):
    job_id = new_job(db)
    with db.begin() as s:
        job = s.get(Job, job_id)
        transition(s, job, JobStatus.RUNNING, worker_id="dead", lease_s=60)
    # lease still valid: another worker leaves it alone
    assert runner(db, storage, settings, ok_compress).run(job_id) == "skipped"
    with db.begin() as s:
        s.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    assert runner(db, storage, settings, ok_compress).run(job_id) == "succeeded"
    job = job_row(db, job_id)
    assert job.attempt == 2 and job.worker_id == "w1"
    with db.session() as s:
        keys = [a.storage_key for a in s.scalars(select(Artifact).where(Artifact.job_id == job_id))]
    assert all(k.startswith(f"artifacts/{job_id}/2/") for k in keys)


def test_a_stale_worker_does_not_touch_the_job_that_replaced_it(db, storage, settings):
    """A reaper requeued the job and another worker took it: the first one must stand down."""
    job_id = new_job(db)

    def hijacked(config, out_dir, progress=None, should_cancel=None, **_hooks):
        with db.begin() as s:
            job = s.get(Job, job_id)
            transition(s, job, JobStatus.QUEUED, message="requeued by a reaper")
            transition(s, job, JobStatus.RUNNING, worker_id="w2", lease_s=60)
        deadline = time.monotonic() + 5
        while not should_cancel() and time.monotonic() < deadline:
            time.sleep(0.01)
        if should_cancel():
            raise Cancelled("not ours any more")
        write_artifact(Path(out_dir), FILES)
        return {}

    assert runner(db, storage, settings, hijacked).run(job_id) == "running"
    job = job_row(db, job_id)
    assert (job.status, job.attempt, job.worker_id, job.error_code) == ("running", 2, "w2", None)


def test_uploaded_files_reach_the_pipeline(client, auth, db, settings):
    text = "\n".join(f"line {i} of the calibration text" for i in range(50)).encode()
    file_id = client.post("/v1/files", files={"file": ("c.txt", text)}, data={"purpose": "calibration"},
                          headers=auth).json()["id"]
    job_id = client.post("/v1/jobs", json={"model": "smollm2-135m", "ratio": 0.4,
                                           "calibration": {"source": "file", "file_id": file_id}},
                         headers=auth).json()["id"]
    seen = {}

    def reads(config, out_dir, progress=None, should_cancel=None, **_hooks):
        seen["source"] = config.calibration.source
        seen["text"] = Path(config.calibration.path).read_bytes()
        write_artifact(Path(out_dir), FILES)
        return {}

    storage = make_storage(settings)
    assert runner(db, storage, settings, reads).run(job_id) == "succeeded"
    assert seen == {"source": "file", "text": text}
    # a file deleted before the job starts fails it as bad input
    job2 = client.post("/v1/jobs", json={"model": "smollm2-135m", "ratio": 0.4,
                                         "evaluation": {"source": "file", "file_id": file_id}},
                       headers=auth).json()["id"]
    with db.begin() as s:
        s.delete(s.get(File, file_id))
    assert runner(db, storage, settings, reads).run(job2) == "failed"
    assert job_row(db, job2).error_code == "invalid_input"


def test_build_config_maps_the_request(settings, tmp_path):
    body = JobCreate(model="smollm2-135m", ratio=0.3, method="asvd", allocation="global", targets="mlp",
                     adapter={"type": "adalora", "init_r": 16, "target_r": 4, "max_steps": 5, "lr": 0.001},
                     calibration={"source": "hf", "dataset": "org/data", "samples": 8, "seq_len": 64},
                     evaluation={"source": "file", "file_id": "file_a", "max_tokens": None, "seq_len": 128,
                                 "throughput": False, "prompts": ["Water boils at"], "sample_tokens": 8},
                     ).model_dump(mode="json")
    config = build_config(body, {"file_a": tmp_path / "a.txt"}, settings)
    assert isinstance(config, CompressConfig)
    assert (config.model, config.ratio, config.method, config.allocation, config.targets) == (
        "smollm2-135m", 0.3, "asvd", "global", "mlp")
    assert (config.recover.type, config.recover.init_r, config.recover.target_r, config.recover.max_steps,
            config.recover.lr) == ("adalora", 16, 4, 5, 0.001)
    train = RecoverConfig().data  # the training text left out: core's default
    assert (config.recover.data.source, config.recover.data.samples, config.recover.data.seed) == (
        "builtin", train.samples, train.seed)
    assert (config.calibration.source, config.calibration.dataset, config.calibration.split,
            config.calibration.samples, config.calibration.seq_len) == ("hf", "org/data", "train", 8, 64)
    assert (config.evaluation.data.path, config.evaluation.max_tokens, config.evaluation.seq_len,
            config.evaluation.throughput) == (str(tmp_path / "a.txt"), None, 128, False)
    assert (config.evaluation.prompts, config.evaluation.sample_tokens) == (["Water boils at"], 8)
    minimal_body = JobCreate(model="smollm2-135m", ratio=0.4).model_dump(mode="json")
    minimal = build_config(minimal_body, {}, settings)
    assert (minimal.calibration.samples, minimal.calibration.seq_len, minimal.evaluation.max_tokens,
            minimal.evaluation.data.split) == (DataSpec().samples, DataSpec().seq_len, EvalConfig().max_tokens,
                                               "evaluation")
    assert (minimal.evaluation.prompts, minimal.evaluation.sample_tokens) == ([], EvalConfig().sample_tokens)
    with pytest.raises(UserError, match="model"):  # re-checked in the worker
        build_config({**body, "model": "/etc"}, {}, settings)
    upd = build_config(JobCreate(model="smollm2-135m", ratio=0.4, adapter={"type": "update", "mix": 0.3})
                       .model_dump(mode="json"), {}, settings)
    assert (upd.recover.type, upd.recover.update_mix) == ("update", 0.3)
    both = build_config(JobCreate(model="smollm2-135m", ratio=0.4, adapter={"type": "lora", "update": True})
                        .model_dump(mode="json"), {}, settings)
    assert (both.recover.type, both.recover.update, both.recover.update_mix) == ("lora", True, UPDATE_MIX)
    assert minimal.recover.refine_passes == 0   # no `refine` object: off
    ref = build_config(JobCreate(model="smollm2-135m", ratio=0.4, adapter={"type": "update"},
                                 refine={"lr": 0.001, "norms": True}).model_dump(mode="json"), {}, settings)
    assert (ref.recover.type, ref.recover.refine_passes, ref.recover.refine_lr, ref.recover.refine_norms) == (
        "update", REFINE_PASSES, 0.001, True)
    with pytest.raises(UserError, match="refine_passes"):   # an out-of-range stored value is refused by core
        build_config({**minimal_body, "refine": {"passes": 1000}}, {}, settings)


@pytest.mark.parametrize("stored", ["validated", "old row"])
def test_request_defaults_are_cores(settings, stored):
    """What a job leaves out is core's default: the API fills core's defaults in before it stores
    the request, and the worker, reading a row that lacks a key, falls back to core's too."""
    def request(**fields):
        body = {"model": "smollm2-135m", "ratio": 0.4, **fields}
        return JobCreate(**body).model_dump(mode="json") if stored == "validated" else body

    config = build_config(request(), {}, settings)
    assert config == CompressConfig(model=config.model, ratio=0.4, device=settings.device,
                                    allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code)
    for kind in ("update", "lora", "adalora"):
        assert build_config(request(adapter={"type": kind}), {}, settings).recover == RecoverConfig(type=kind)
    partial = {"type": "lora", "data": {"source": "builtin", "samples": 8}}  # what a source leaves out: DataSpec's
    assert build_config(request(adapter=partial), {}, settings).recover.data == DataSpec(split="calibration", samples=8)


def test_api_model_aliases_match_core():
    from svdforge.core.models import ALIASES
    from svdforge.persistence.modelref import ALIASES as SERVICE_ALIASES

    assert set(ALIASES) == set(SERVICE_ALIASES)


def test_s3_storage_through_the_api(tmp_path, monkeypatch):
    """With SVDFORGE_STORAGE=s3: artifacts land in the bucket, the API presigns and streams them."""
    import boto3
    from fastapi.testclient import TestClient
    from moto import mock_aws

    from svdforge.api.main import create_app

    from .conftest import fresh_database, make_settings

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="forge")
        settings = make_settings(tmp_path, storage="s3", s3_bucket="forge", s3_prefix="env/prod",
                                 s3_region="us-east-1", presign_expires_s=900)
        db = fresh_database(settings)
        with db.begin() as s:
            _, token = create_key(s, "s3")
        auth = {"Authorization": f"Bearer {token}"}
        with TestClient(create_app(settings)) as client:
            assert client.get("/readyz").json()["checks"]["storage"] == "ok"
            job_id = client.post("/v1/jobs", json={"model": "smollm2-135m", "ratio": 0.4}, headers=auth).json()["id"]
            assert JobRunner(db, make_storage(settings), settings, compress=ok_compress).run(job_id) == "succeeded"
            arts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]}
            a = arts["model.safetensors"]
            assert "X-Amz-Signature=" in a["download_url"] and "/env/prod/artifacts/" in a["download_url"]
            assert a["download_url_expires_at"] is not None
            body = client.get(a["content_url"], headers={**auth, "Range": "bytes=10-19"})
            assert body.status_code == 206 and body.content == FILES["model.safetensors"][10:20]
            keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="forge")["Contents"]]
            assert f"env/prod/artifacts/{job_id}/1/model.safetensors" in keys
        db.dispose()


def test_cancel_during_a_long_evaluation_stops_it(tmp_path, tiny_model_root):
    """A real job on the tiny model whose evaluation has 6250 windows: cancelled once its
    `evaluate` stage shows, it ends `cancelled` after a small part of them, with no artifacts
    (the checkpoint uploaded before evaluation goes too)."""
    from svdforge.worker.runner import default_compress

    from .conftest import fresh_database, make_settings

    settings = make_settings(tmp_path, model_root=tiny_model_root)
    db = fresh_database(settings)
    storage = make_storage(settings)
    job_id = new_job(db, model=str(tiny_model_root / "tiny"), calibration={"source": "builtin", "samples": 4,
                                                                             "seq_len": 32},
                     evaluation={"source": "builtin", "seq_len": 32, "max_tokens": 6250 * 32, "throughput": False})
    fractions: list[float] = []

    def watched(config, out_dir, progress=None, should_cancel=None, **hooks):
        def seen(event):
            if event.get("type") == "progress" and event.get("stage") == "evaluate":
                fractions.append(event["fraction"])
            progress(event)
        return default_compress(config, out_dir, progress=seen, should_cancel=should_cancel, **hooks)

    def cancel_at_evaluate():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with db.begin() as s:
                job = s.get(Job, job_id)
                if job.status not in ("queued", "running"):
                    return
                if job.status == "running" and job.stage == "evaluate":
                    transition(s, job, JobStatus.CANCELLING, message="cancel requested")
                    return
            time.sleep(0.02)

    t = threading.Thread(target=cancel_at_evaluate)
    t.start()
    try:
        assert runner(db, storage, settings, watched).run(job_id) == "cancelled"
    finally:
        t.join()
    job = job_row(db, job_id)
    assert job.status == "cancelled" and job.error_code is None
    assert max(fractions, default=0.0) < 0.9 * 0.5, fractions  # stopped before half of the windows
    with db.session() as s:
        assert s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []
    assert not list((settings.storage_dir / "artifacts").glob(f"{job_id}*/**/*.*"))
    db.dispose()


def test_a_window_longer_than_the_model_fails_the_job_at_its_start(tmp_path, tiny_model_root):
    """Where the API could not read the model's config (a hub model; here a row written
    directly), the pipeline refuses the window when the job starts: invalid_input naming it."""
    from .conftest import fresh_database, make_settings

    settings = make_settings(tmp_path, model_root=tiny_model_root)
    db = fresh_database(settings)
    job_id = new_job(db, model=str(tiny_model_root / "tiny"),
                     evaluation={"source": "builtin", "seq_len": 2048, "max_tokens": 4096})
    assert JobRunner(db, make_storage(settings), settings).run(job_id) == "failed"
    job = job_row(db, job_id)
    assert (job.error_code, job.error_stage) == ("invalid_input", "load")
    assert job.error_message.startswith("evaluation.seq_len: 2048 is longer than the model's 1024 positions")
    db.dispose()

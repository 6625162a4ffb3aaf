"""Crash safety (issue 5) in one process: the atomic claim, the lease and its heartbeat, the
reaper (requeue, attempt cap, message sends), and checkpoint/resume with a worker that dies
after the artifact was saved. The same with real processes and servers: tests/integration."""
from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from svdforge.core.pipeline import compress as real_compress
from svdforge.persistence.jobs import claim_sends
from svdforge.persistence.state import JobStatus, StaleTransition, transition
from svdforge.persistence.storage import LocalStorage, make_storage
from svdforge.persistence.tables import Artifact, Job, JobEvent, utcnow
from svdforge.worker.reaper import Reaper
from svdforge.worker.runner import JobRunner

from .conftest import TINY_REQUEST_OPTIONS
from .test_runner import FILES, job_row, new_job, write_artifact


class Crash(BaseException):
    """Stands for kill -9: nothing of the runner's error handling runs (only `finally`)."""


@pytest.fixture
def storage(settings):
    settings.ensure_dirs()
    return make_storage(settings)


def stored(settings, job_id) -> set[str]:
    root = settings.storage_dir / "artifacts" / job_id
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def expire(db, job_id, seconds_ago: float = 1.0) -> None:
    with db.begin() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=seconds_ago)))


def reaper(db, storage, settings, sent: list | None = None) -> Reaper:
    sent = [] if sent is None else sent
    return Reaper(db, storage, settings, sent.append)


def saving_compress(crash_after_save: bool, after_save=None):
    """A stand-in pipeline that saves, checkpoints through `on_saved`, then maybe dies.

    `after_save(should_cancel)` runs right after the checkpoint (a test's fault goes there)."""
    calls = []

    def fake(config, out_dir, progress=None, should_cancel=None, on_saved=None, resume=None):
        calls.append({"resume": resume, "files": sorted(p.name for p in Path(out_dir).glob("*"))
                      if Path(out_dir).exists() else []})
        if resume is None:
            for stage in ("whiten", "svd"):
                progress({"type": "stage_started", "stage": stage})
                progress({"type": "stage_finished", "stage": stage, "seconds": 0.5})
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_bytes(FILES["model.safetensors"])
            (out / "config.json").write_bytes(FILES["config.json"])
            on_saved(out, {"ranks": {}, "params": {"dense": 10}})
            if after_save is not None:
                after_save(should_cancel)
            if crash_after_save:
                raise Crash()
        progress({"type": "stage_started", "stage": "evaluate"})
        progress({"type": "stage_finished", "stage": "evaluate", "seconds": 0.1})
        write_artifact(Path(out_dir), {**FILES, "report.json": b'{"metrics": {"compressed": {"ppl": 3.0}}}'})
        return {"metrics": {"compressed": {"ppl": 3.0}}, "resumed": resume is not None}

    fake.calls = calls
    return fake


# --- the claim -----------------------------------------------------------------------------
def test_only_one_of_many_concurrent_claims_wins(db, storage, settings):
    job_id = new_job(db)
    barrier = threading.Barrier(6)
    results = {}

    def claim(i):
        barrier.wait()
        results[i] = JobRunner(db, storage, settings, worker_id=f"w{i}")._claim(job_id)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r is not None]
    assert len(winners) == 1
    job = job_row(db, job_id)
    assert (job.status, job.attempt, job.worker_id) == ("running", 1, f"w{winners[0]}")
    with db.session() as s:
        running = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "status")).all()
    assert [e.data["to"] for e in running] == ["queued", "running"]


def test_a_claim_from_a_stale_read_of_the_attempt_fails(db):
    """Read queued at attempt 0; meanwhile another worker ran it and it was requeued (attempt 1)."""
    job_id = new_job(db)
    stale_session = db.session()
    try:
        stale = stale_session.get(Job, job_id)
        stale_session.commit()
        with db.begin() as s:
            job = s.get(Job, job_id)
            transition(s, job, JobStatus.RUNNING, worker_id="w1", lease_s=60)
            transition(s, job, JobStatus.QUEUED, message="requeued")
        with pytest.raises(StaleTransition):  # same status as read, other attempt: refused
            transition(stale_session, stale, JobStatus.RUNNING, worker_id="w2", lease_s=60)
        stale_session.rollback()
    finally:
        stale_session.close()
    assert job_row(db, job_id).attempt == 1


def test_a_requeue_loses_to_a_heartbeat_that_renewed_the_lease(db):
    job_id = new_job(db)
    with db.begin() as s:
        transition(s, s.get(Job, job_id), JobStatus.RUNNING, worker_id="w1", lease_s=60)
    with db.begin() as s, pytest.raises(StaleTransition):
        transition(s, s.get(Job, job_id), JobStatus.QUEUED, lease_expired_by=utcnow())
    assert job_row(db, job_id).status == "running"


# --- the reaper ----------------------------------------------------------------------------
def test_reaper_requeues_an_expired_lease_and_sends_once(db, storage, settings):
    job_id = new_job(db)
    with db.begin() as s:
        transition(s, s.get(Job, job_id), JobStatus.RUNNING, worker_id="dead", lease_s=60)
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
    sent: list[str] = []
    r = reaper(db, storage, settings, sent)
    assert r.sweep()[0].requeued == []  # lease still valid: left alone
    expire(db, job_id)
    found, _ = r.sweep()
    assert found.requeued == [job_id] and sent == [job_id]
    job = job_row(db, job_id)
    assert (job.status, job.attempt, job.worker_id, job.lease_expires_at) == ("queued", 1, None, None)
    assert job.enqueued_at is not None
    r.sweep()
    assert sent == [job_id]  # marked as sent: not sent again on the next sweep
    # the message was lost (a broker wiped): sent again once resend_after_s has passed
    with db.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1)))
    r.sweep()
    assert sent == [job_id, job_id]


def test_reaper_fails_a_job_over_the_attempt_cap_and_deletes_its_files(db, storage, settings):
    job_id = new_job(db)
    with db.begin() as s:
        job = s.get(Job, job_id)
        for attempt in range(settings.max_attempts):
            transition(s, job, JobStatus.RUNNING, worker_id=f"w{attempt}", lease_s=60)
            if attempt < settings.max_attempts - 1:
                transition(s, job, JobStatus.QUEUED)
    (settings.storage_dir / "artifacts" / job_id / "3").mkdir(parents=True)
    (settings.storage_dir / "artifacts" / job_id / "3" / "model.safetensors").write_bytes(b"x")
    expire(db, job_id)
    sent: list[str] = []
    found, _ = reaper(db, storage, settings, sent).sweep()
    assert found.failed == [job_id] and sent == []
    job = job_row(db, job_id)
    assert (job.status, job.error_code, job.attempt) == ("failed", "worker_lost", 3)
    assert "lost 3 times" in job.error_message and "max_attempts 3" in job.error_message
    assert stored(settings, job_id) == set()


def test_jobs_the_api_could_not_enqueue_are_sent_after_a_grace(db, storage, settings):
    job_id = new_job(db)  # committed, never enqueued (the broker was down, or the API died)
    sent: list[str] = []
    r = reaper(db, storage, settings, sent)
    r.sweep()
    assert sent == []  # the API may still be sending it
    with db.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(created_at=utcnow() - timedelta(seconds=60)))
    r.sweep()
    assert sent == [job_id]


def test_a_failed_send_is_retried_by_the_next_sweep(db, storage, settings):
    settings.enqueue_grace_s = 0
    job_id = new_job(db)

    def down(job_id):
        raise ConnectionError("broker down")

    Reaper(db, storage, settings, down).sweep()
    assert job_row(db, job_id).enqueued_at is None
    sent: list[str] = []
    reaper(db, storage, settings, sent).sweep()
    assert sent == [job_id]


def test_concurrent_send_claims_send_each_job_once(db, settings):
    ids = [new_job(db) for _ in range(3)]
    later = utcnow() + timedelta(seconds=1)
    with db.begin() as s:
        first = claim_sends(s, now=later)
    with db.begin() as s:
        second = claim_sends(s, now=later)
    assert sorted(first) == sorted(ids) and second == []


def test_reaper_thread_sweeps_periodically(db, storage, settings):
    settings.reap_interval_s = 0.05
    job_id = new_job(db)
    with db.begin() as s:
        transition(s, s.get(Job, job_id), JobStatus.RUNNING, worker_id="dead", lease_s=60)
    sent: list[str] = []
    r = reaper(db, storage, settings, sent).start()
    try:
        expire(db, job_id)
        deadline = utcnow() + timedelta(seconds=5)
        while not sent and utcnow() < deadline:
            threading.Event().wait(0.02)
    finally:
        r.stop()
    assert sent == [job_id]


def test_default_recovery_settings():
    from svdforge.persistence.settings import Settings

    s = Settings(_env_file=None)
    assert (s.lease_s, s.reap_every_s, s.max_attempts, s.progress_interval_s) == (60, 20.0, 3, 1.0)
    assert s.lease_s + s.reap_every_s < 120  # the kill -9 recovery goal
    with pytest.raises(ValueError, match="heartbeat"):
        Settings(lease_s=2, progress_interval_s=1.5)


# --- heartbeat ---------------------------------------------------------------------------
def test_the_heartbeat_renews_the_lease_while_the_job_runs(db, storage, settings):
    settings.lease_s, settings.progress_interval_s = 2, 0.05
    job_id = new_job(db)
    seen = []

    def long(config, out_dir, progress=None, should_cancel=None, **_):
        for _ in range(3):  # 3 s: longer than the lease, which must keep moving
            threading.Event().wait(1.0)
            seen.append(job_row(db, job_id).lease_expires_at)
        write_artifact(Path(out_dir), FILES)
        return {}

    assert JobRunner(db, storage, settings, compress=long, worker_id="w1").run(job_id) == "succeeded"
    assert all(t > utcnow() - timedelta(seconds=2) for t in seen) and seen == sorted(seen)
    assert seen[-1] > seen[0] + timedelta(seconds=1.5)


# --- checkpoint and resume -----------------------------------------------------------------
def test_a_retry_resumes_from_the_checkpoint_of_a_dead_attempt(db, storage, settings):
    job_id = new_job(db)
    first = saving_compress(crash_after_save=True)
    with pytest.raises(Crash):
        JobRunner(db, storage, settings, compress=first, worker_id="w1").run(job_id)
    job = job_row(db, job_id)
    with db.session() as s:
        checkpoint = s.get(Job, job_id).checkpoint
    assert job.status == "running" and checkpoint["attempt"] == 1
    assert set(checkpoint["files"]) == {"model.safetensors", "config.json"}
    assert stored(settings, job_id) == {"1/model.safetensors", "1/config.json"}

    expire(db, job_id)
    sent: list[str] = []
    reaper(db, storage, settings, sent).sweep()
    assert sent == [job_id]
    second = saving_compress(crash_after_save=False)
    assert JobRunner(db, storage, settings, compress=second, worker_id="w2").run(job_id) == "succeeded"
    assert second.calls[0]["resume"] == {"ranks": {}, "params": {"dense": 10}}
    assert second.calls[0]["files"] == ["config.json", "model.safetensors"]  # restored before compress ran

    job = job_row(db, job_id)
    assert (job.status, job.attempt, job.worker_id) == ("succeeded", 2, "w2")
    assert job.stages["whiten"]["status"] == "completed" and job.stages["svd"]["seconds"] == 0.5  # carried over
    with db.session() as s:
        arts = s.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        assert s.get(Job, job_id).checkpoint is None
    names = [a.name for a in arts]
    assert len(names) == len(set(names)) == 4  # no duplicate rows
    assert all(a.storage_key.startswith(f"artifacts/{job_id}/2/") for a in arts)
    assert stored(settings, job_id) == {f"2/{n}" for n in names}  # the dead attempt's files are gone
    for a in arts:
        assert hashlib.sha256(b"".join(storage.open_range(a.storage_key))).hexdigest() == a.sha256


def test_the_checkpoint_is_uploaded_once_and_becomes_the_artifact(db, settings):
    settings.ensure_dirs()
    puts: list[str] = []

    class Counting(LocalStorage):
        def put_file(self, key, path, **kw):
            puts.append(key)
            super().put_file(key, path, **kw)

    job_id = new_job(db)
    runner = JobRunner(db, Counting(settings.storage_dir), settings, compress=saving_compress(False))
    assert runner.run(job_id) == "succeeded"
    assert sorted(puts) == sorted(f"artifacts/{job_id}/1/{n}" for n in (*FILES, "svdforge.json"))


def test_a_failed_job_leaves_neither_checkpoint_nor_files(db, storage, settings):
    from svdforge.core.errors import UserError

    job_id = new_job(db)

    def fail(should_cancel):
        raise UserError("bad evaluation data")

    assert JobRunner(db, storage, settings, compress=saving_compress(False, fail)).run(job_id) == "failed"
    with db.session() as s:
        assert s.get(Job, job_id).checkpoint is None
    assert stored(settings, job_id) == set()


def test_a_shutdown_requeue_keeps_the_checkpoint_for_the_next_worker(db, storage, settings):
    job_id = new_job(db)
    runner = JobRunner(db, storage, settings, worker_id="w1")

    def stop(should_cancel):
        from svdforge.core.errors import Cancelled

        runner.stopping.set()  # SIGTERM to the worker
        raise Cancelled("worker shutting down")

    runner.compress = saving_compress(False, stop)
    assert runner.run(job_id) == "queued"
    assert stored(settings, job_id) == {"1/model.safetensors", "1/config.json"}
    second = saving_compress(crash_after_save=False)
    assert JobRunner(db, storage, settings, compress=second, worker_id="w2").run(job_id) == "succeeded"
    assert second.calls[0]["resume"] is not None
    assert {p.split("/")[0] for p in stored(settings, job_id)} == {"2"}


def test_a_stale_worker_keeps_the_checkpoint_that_the_next_attempt_resumes_from(db, storage, settings):
    job_id = new_job(db)

    def stolen(should_cancel):
        with db.begin() as s:  # the lease ran out, a reaper requeued, w2 claimed attempt 2
            job = s.get(Job, job_id)
            transition(s, job, JobStatus.QUEUED, message="requeued by a reaper")
            transition(s, job, JobStatus.RUNNING, worker_id="w2", lease_s=60)
        deadline = utcnow() + timedelta(seconds=5)
        while not should_cancel() and utcnow() < deadline:
            threading.Event().wait(0.01)

    hijacked = saving_compress(False, stolen)
    assert JobRunner(db, storage, settings, compress=hijacked, worker_id="w1").run(job_id) == "running"
    assert stored(settings, job_id) >= {"1/model.safetensors", "1/config.json"}  # attempt 2 needs them
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (job.attempt, job.worker_id, job.checkpoint["attempt"]) == (2, "w2", 1)


def test_a_real_job_resumes_after_a_crash_during_evaluation(db, settings, tiny_model_root, client, auth):
    """The real pipeline: attempt 1 dies right after its checkpoint; attempt 2 only evaluates,
    and its model.safetensors is byte for byte the one attempt 1 computed."""
    settings.model_root = tiny_model_root
    storage = make_storage(settings)
    body = {"model": str(tiny_model_root / "tiny"), "ratio": 0.4, **TINY_REQUEST_OPTIONS}
    job_id = client.post("/v1/jobs", json=body, headers=auth).json()["id"]
    checkpointed = {}
    first: list[dict] = []

    def dies_after_save(config, out_dir, progress=None, should_cancel=None, on_saved=None, resume=None):
        def saved_then_die(out, report):
            on_saved(out, report)
            checkpointed["sha"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
            raise Crash()
        return real_compress(config, out_dir, lambda e: (first.append(e), progress(e)), should_cancel,
                             on_saved=saved_then_die, resume=resume)

    with pytest.raises(Crash):
        JobRunner(db, storage, settings, compress=dies_after_save, worker_id="w1").run(job_id)
    expire(db, job_id)
    reaper(db, storage, settings).sweep()
    events: list[dict] = []

    def spy(config, out_dir, progress=None, should_cancel=None, **hooks):
        return real_compress(config, out_dir, lambda e: (events.append(e), progress(e)), should_cancel, **hooks)

    assert JobRunner(db, storage, settings, compress=spy, worker_id="w2").run(job_id) == "succeeded"
    assert {e["stage"] for e in events if e["type"] == "stage_started"} == {"evaluate"}
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert job["attempt"] == 2
    # what attempt 1 finished shows as completed
    assert {s["name"]: s["status"] for s in job["stages"]} == {
        "load": "completed", "whiten": "completed", "svd": "completed", "recover": "skipped", "evaluate": "completed",
        "upload": "completed"}
    arts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["data"]}
    assert arts["model.safetensors"]["sha256"] == checkpointed["sha"]
    report = client.get(f"/v1/jobs/{job_id}/report", headers=auth).json()
    assert report["resumed"]["skipped_stages"] == ["load", "whiten", "svd", "recover", "save"]
    assert report["metrics"]["compressed"]["ppl"] > 0
    assert stored(settings, job_id) == {f"2/{name}" for name in arts}


def test_a_worker_that_cannot_renew_its_lease_stops_before_it_expires(db, storage, settings):
    """Fencing: with the database unreachable from the worker, it stops computing at 80% of the
    lease (a reaper could hand the job to another worker after 100%), and requeues the job once
    it can write again."""
    from svdforge.core.errors import Cancelled
    from svdforge.persistence.db import Database

    settings.lease_s, settings.progress_interval_s = 2, 0.05
    job_id = new_job(db)
    down = threading.Event()

    class Flaky(Database):
        def begin(self, *, write: bool = True):
            if down.is_set():
                raise ConnectionError("database unreachable")
            return super().begin(write=write)

    flaky = Flaky(settings)
    stopped_after = {}

    def computes(config, out_dir, progress=None, should_cancel=None, **_):
        down.set()
        t0 = utcnow()
        while not should_cancel() and utcnow() - t0 < timedelta(seconds=10):
            threading.Event().wait(0.02)
        stopped_after["s"] = (utcnow() - t0).total_seconds()
        down.clear()
        raise Cancelled("stopped")

    try:
        assert JobRunner(flaky, storage, settings, compress=computes, worker_id="w1").run(job_id) == "queued"
    finally:
        flaky.dispose()
    assert 1.0 < stopped_after["s"] < 2.0  # before the 2 s lease ran out
    job = job_row(db, job_id)
    assert (job.status, job.attempt) == ("queued", 1)
    with db.session() as s:
        messages = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert "requeued: its lease could not be renewed" in messages

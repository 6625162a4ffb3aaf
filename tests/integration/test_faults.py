"""Fault tests (issue 5): each kills or restarts a real process and asserts what the
service promises: an accepted job is never lost and never runs twice at once.

Lease settings are shortened here (lease 6 s, reaper every 1 s) so that a recovery takes
seconds; bench/crash_recovery.py measures it with the defaults (lease 60 s)."""
from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from svdforge.persistence.tables import Job, JobEvent

from .conftest import TERMINAL, TINY, wait_job

LEASE_S, REAP_S = 6, 1.0
# Real request options that make one stage last seconds on the tiny model, so that a kill lands in it.
LONG = {
    "whiten": {"calibration": {"source": "builtin", "samples": 768, "seq_len": 256},
               "evaluation": {"source": "builtin", "seq_len": 32, "max_tokens": 256, "throughput": False}},
    "evaluate": {"calibration": {"source": "builtin", "samples": 4, "seq_len": 32},
                 "evaluation": {"source": "builtin", "seq_len": 128, "max_tokens": 65536, "throughput": False}},
}


def submit(client, model_root, options: dict, key: str | None = None) -> str:
    headers = {"Idempotency-Key": key} if key else {}
    r = client.post("/v1/jobs", json={"model": str(model_root / "tiny"), "ratio": 0.4, **options}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def status_path(stack, job_id: str) -> list[tuple[str, int]]:
    db = stack.database()
    try:
        with db.session() as s:
            events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "status")
                               .order_by(JobEvent.id)).all()
            return [(e.data["to"], e.data["attempt"]) for e in events]
    finally:
        db.dispose()


def checkpoint_of(stack, job_id: str) -> dict | None:
    db = stack.database()
    try:
        with db.session() as s:
            return s.get(Job, job_id).checkpoint
    finally:
        db.dispose()


def downloaded_artifacts(client, job_id: str) -> dict[str, str]:
    """{name: sha256} of every artifact, each downloaded and checked against its record."""
    out = {}
    for a in client.get(f"/v1/jobs/{job_id}/artifacts", params={"limit": 100}).json()["data"]:
        body = client.get(a["content_url"]).content
        assert hashlib.sha256(body).hexdigest() == a["sha256"], a["name"]
        assert a["name"] not in out, f"duplicate artifact {a['name']}"
        out[a["name"]] = a["sha256"]
    return out


@pytest.mark.parametrize("stage", ["whiten", "evaluate"])
def test_kill_9_of_the_worker_mid_job(make_stack, model_root, stage):
    """kill -9 during `stage`; a new worker finishes the job as attempt 2 within the lease plus
    a margin; after `evaluate` (the artifact was checkpointed) only evaluate and upload run
    again. The artifacts equal those of an uninterrupted run of the same request (sha256),
    with no duplicates and nothing left of the dead attempt in the bucket."""
    stack = make_stack(lease_s=LEASE_S, reap_interval_s=REAP_S)
    stack.start_api()
    first = stack.start_worker("w1")
    with stack.client() as client:
        # what an uninterrupted run of the same request produces (the calibration statistics cache
        # is off in these deployments: the killed job computes everything itself)
        reference = submit(client, model_root, LONG[stage], "reference") if stage == "whiten" else None
        job_id = submit(client, model_root, LONG[stage], "killed")
        if reference:
            assert wait_job(client, reference, timeout=180)["status"] == "succeeded"
        # sequential calibration interleaves whiten and svd layer by layer: either is before the checkpoint
        stages = {"whiten", "svd"} if stage == "whiten" else {stage}
        wait_job(client, job_id, until=lambda j: j["status"] == "running" and j["stage"] in stages, timeout=120,
                 interval=0.05)
        first.kill()
        killed_at = time.monotonic()
        stack.start_worker("w2")
        checkpoint = checkpoint_of(stack, job_id)
        assert (checkpoint is not None) == (stage == "evaluate")
        back = wait_job(client, job_id, until=lambda j: j["attempt"] == 2, timeout=LEASE_S + 60)
        recovered_s = time.monotonic() - killed_at
        job = wait_job(client, job_id, timeout=180)
        done_s = time.monotonic() - killed_at
        print(f"\nkill -9 during {stage}: running again (attempt 2) after {recovered_s:.1f} s, "
              f"succeeded after {done_s:.1f} s (lease {LEASE_S} s, reaper every {REAP_S} s)")
        assert back["attempt"] == 2
        assert job["status"] == "succeeded" and job["attempt"] == 2, job
        # the lease, a reaper pass, and the new worker's start (it was started after the kill)
        assert recovered_s < LEASE_S + REAP_S + 30
        assert status_path(stack, job_id) == [("queued", 0), ("running", 1), ("queued", 1), ("running", 2),
                                             ("succeeded", 2)]
        got = downloaded_artifacts(client, job_id)
        report = client.get(f"/v1/jobs/{job_id}/report").json()
        if reference:  # recomputed by attempt 2: the same bytes as the uninterrupted run
            want = downloaded_artifacts(client, reference)
            assert set(got) == set(want)
            for name in ("model.safetensors", "config.json", "tokenizer.json"):
                assert got[name] == want[name], name
            ref_report = client.get(f"/v1/jobs/{reference}/report").json()
            assert report["metrics"]["compressed"]["ppl"] == pytest.approx(
                ref_report["metrics"]["compressed"]["ppl"], rel=1e-4)
        else:  # resumed: the weights attempt 1 computed and checkpointed before it died
            for name, meta in checkpoint["files"].items():
                assert got[name] == meta["sha256"], name
        assert {"model.safetensors", "config.json", "report.json", "svdforge.json"} <= set(got)
        messages = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
                    .json()["data"]]
        if stage == "evaluate":  # checkpointed before it died: whiten/svd/recover/save not run again
            assert report["resumed"]["skipped_stages"] == ["load", "whiten", "svd", "recover", "save"]
            assert any(m.startswith("resumed from the checkpoint of attempt 1") for m in messages)
        else:  # died before its checkpoint: attempt 2 ran everything
            assert "resumed" not in report
            assert not any(m.startswith("resumed") for m in messages)
    # the runner deletes what lost attempts left right after it commits the success: give it a moment
    want_keys = sorted(f"artifacts/{job_id}/2/{name}" for name in got)
    deadline = time.monotonic() + 30
    while (keys := sorted(stack.servers.s3.keys(stack.bucket, f"artifacts/{job_id}/"))) != want_keys \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert keys == want_keys


def test_killing_the_api_during_a_burst_loses_no_accepted_job(make_stack, model_root):
    """kill -9 of uvicorn while 4 clients submit; a new API process comes up on the same port.
    Every job that got a 201 exists and succeeds, and so does every job in the database
    (a job committed just before the kill, whose 201 never left, is not lost either)."""
    stack = make_stack(lease_s=10, reap_interval_s=REAP_S, enqueue_grace_s=2)
    api = stack.start_api()
    stack.start_worker("w1")
    stack.start_worker("w2")
    accepted: list[str] = []
    failures: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def client_loop() -> None:
        with stack.client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post("/v1/jobs", json={"model": str(model_root / "tiny"), "ratio": 0.4, **TINY})
                    with lock:
                        (accepted if r.status_code == 201 else failures).append(
                            r.json()["id"] if r.status_code == 201 else str(r.status_code))
                except httpx.HTTPError as e:
                    with lock:
                        failures.append(type(e).__name__)
                time.sleep(0.1)

    def wait_accepted(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(accepted) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_accepted(6)
        api.kill()
        killed_with = len(accepted)
        time.sleep(1.0)
        stack.start_api()
        wait_accepted(killed_with + 6)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"\n{len(accepted)} accepted ({killed_with} before the kill), {len(failures)} failed: "
          f"{sorted(set(failures))}")
    assert failures, "the kill did not land during the burst"
    assert len(accepted) >= killed_with + 6, "the new API process accepted too little"
    assert all(f not in ("500", "502", "503") for f in failures)
    with stack.client() as client:
        for job_id in accepted:
            job = wait_job(client, job_id, timeout=180)
            assert job["status"] == "succeeded" and job["attempt"] == 1, job
    db = stack.database()
    try:
        with db.session() as s:
            rows = s.execute(select(Job.id, Job.status)).all()
    finally:
        db.dispose()
    assert set(accepted) <= {r.id for r in rows}
    with stack.client() as client:
        for job_id in {r.id for r in rows} - set(accepted):
            assert wait_job(client, job_id, timeout=120)["status"] == "succeeded"


@pytest.mark.parametrize("broker", ["restarted", "wiped"])
def test_jobs_queued_when_redis_restarts_still_run(make_stack, model_root, servers, broker):
    """Redis goes away while one job runs and four wait in its queue. `restarted`: SIGTERM and
    start again (its append-only file keeps the messages). `wiped`: kill -9 and start empty
    (the messages are gone): the reaper sends them again after resend_after_s. Either way every
    job succeeds, once: the running one was not disturbed (its lease lives in PostgreSQL)."""
    stack = make_stack(lease_s=10, reap_interval_s=REAP_S, resend_after_s=5)
    stack.start_api()
    stack.start_worker("w1")
    with stack.client() as client:
        running = submit(client, model_root, LONG["evaluate"])
        wait_job(client, running, until=lambda j: j["status"] == "running", timeout=120, interval=0.05)
        queued = [submit(client, model_root, TINY) for _ in range(4)]
        assert all(client.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in queued)
        if broker == "restarted":
            servers.redis.stop()
        else:
            servers.redis.stop(__import__("signal").SIGKILL)
            servers.redis.wipe()
        time.sleep(2)
        servers.redis.start()
        for job_id in [running, *queued]:
            job = wait_job(client, job_id, timeout=180)
            assert job["status"] == "succeeded" and job["attempt"] == 1, job
            assert status_path(stack, job_id) == [("queued", 0), ("running", 1), ("succeeded", 1)]


def test_two_workers_never_run_the_same_job_at_once(make_stack, model_root):
    """Two workers, and every job's message sent three times (a redelivery, a reaper's resend):
    each job runs exactly once; every extra message is dropped by the claim."""
    from svdforge.persistence.queue import enqueue, make_celery

    stack = make_stack()
    stack.start_api()
    workers = [stack.start_worker("w1"), stack.start_worker("w2")]
    producer = make_celery(stack.settings)
    with stack.client() as client:
        ids = [submit(client, model_root, TINY) for _ in range(8)]
        for _ in range(2):
            for job_id in ids:
                enqueue(producer, job_id)
        jobs = [wait_job(client, job_id, timeout=180) for job_id in ids]
    assert all(j["status"] == "succeeded" and j["attempt"] == 1 for j in jobs), jobs
    for job_id in ids:
        assert status_path(stack, job_id) == [("queued", 0), ("running", 1), ("succeeded", 1)]
    db = stack.database()
    try:
        with db.session() as s:
            ran_on = {s.get(Job, j).worker_id for j in ids}
    finally:
        db.dispose()
    # every one of the 24 messages was consumed: 8 ran a job, 16 were dropped by the claim
    def outcomes(text: str, what: str) -> int:  # the workers' JSON lines: the runner logs each run's end
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return sum(1 for r in lines if r.get("logger") == "svdforge.worker" and r.get("message") == f"job {what}"
                   and r.get("status") == what and r.get("job_id") in ids)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logs = "".join(w.tail(10_000_000) for w in workers)
        if outcomes(logs, "skipped") >= 16:
            break
        time.sleep(0.2)
    assert (outcomes(logs, "succeeded"), outcomes(logs, "skipped")) == (8, 16), logs[-3000:]
    assert all(outcomes(w.tail(10_000_000), "succeeded") for w in workers), "one worker ran nothing"
    assert len(ran_on) == 2


def test_concurrent_claims_on_postgresql_have_one_winner(make_stack):
    """The claim is one conditional UPDATE: 8 threads, 8 runners, 10 jobs, one winner each."""
    from svdforge.persistence.jobs import create_job
    from svdforge.persistence.keys import create_key
    from svdforge.persistence.storage import make_storage
    from svdforge.worker.runner import JobRunner

    stack = make_stack()
    db = stack.database()
    storage = make_storage(stack.settings)
    try:
        with db.begin() as s:
            key, _ = create_key(s, "claims")
            ids = [create_job(s, key.id, {"model": "smollm2-135m", "ratio": 0.4}).id for _ in range(10)]
        for job_id in ids:
            barrier, wins = threading.Barrier(8), []

            def claim(i: int, job_id: str = job_id, barrier=barrier, wins=wins) -> None:
                barrier.wait()
                if JobRunner(db, storage, stack.settings, worker_id=f"w{i}")._claim(job_id) is not None:
                    wins.append(i)

            threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(wins) == 1, (job_id, wins)
            with db.session() as s:
                job = s.get(Job, job_id)
                assert (job.status, job.attempt, job.worker_id) == ("running", 1, f"w{wins[0]}")
    finally:
        db.dispose()


def test_a_job_over_the_attempt_cap_fails_with_worker_lost(make_stack, model_root):
    """max_attempts 2: the worker is killed during each attempt; the reaper fails the job with
    a clear `worker_lost` error instead of trying forever, and its files are deleted."""
    stack = make_stack(lease_s=4, reap_interval_s=0.5, max_attempts=2)
    stack.start_api()
    with stack.client() as client:
        job_id = submit(client, model_root, LONG["whiten"])
        for attempt in (1, 2):
            worker = stack.start_worker(f"w{attempt}")
            wait_job(client, job_id, until=lambda j, a=attempt: j["attempt"] == a and j["stage"] in ("whiten", "svd"),
                     timeout=120, interval=0.05)
            worker.kill()
        stack.start_worker("w3")  # its reaper finds the expired lease of attempt 2
        job = wait_job(client, job_id, timeout=60)
    assert job["status"] == "failed" and job["attempt"] == 2
    assert job["error"]["code"] == "worker_lost"
    assert "lost 2 times" in job["error"]["message"] and "max_attempts 2" in job["error"]["message"]
    assert stack.servers.s3.keys(stack.bucket, f"artifacts/{job_id}/") == []
    assert TERMINAL  # (imported for wait_job's default)

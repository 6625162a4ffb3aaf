"""The job state machine: a table of every (from, to) pair, allowed or refused, on a real row."""
from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from sqlalchemy import select

from svdforge.persistence.jobs import create_job, recover_orphans
from svdforge.persistence.keys import create_key
from svdforge.persistence.state import (
    IllegalTransition,
    JobError,
    JobStatus,
    StaleTransition,
    transition,
)
from svdforge.persistence.tables import Job, JobEvent, utcnow

Q, R, CI, S, F, CD = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.SUCCEEDED,
                      JobStatus.FAILED, JobStatus.CANCELLED)

# Written out by hand (not derived from persistence.state.ALLOWED) so that a change there fails here.
EXPECTED_ALLOWED = {
    (Q, R), (Q, CD),
    (R, S), (R, F), (R, CI), (R, Q),
    (CI, CD), (CI, F),
}
ALL_PAIRS = list(itertools.product(JobStatus, JobStatus))


def _job_in(db, status: JobStatus) -> str:
    """A job row forced into `status` by walking allowed transitions."""
    path = {Q: [], R: [R], CI: [R, CI], S: [R, S], F: [R, F], CD: [CD]}[status]
    with db.begin() as s:
        key, _ = create_key(s, "k")
        job = create_job(s, key.id, {"model": "smollm2-135m", "ratio": 0.4})
        for to in path:
            transition(s, job, to, lease_s=60, worker_id="w")
        return job.id


@pytest.mark.parametrize(("frm", "to"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_transition_table(db, frm, to):
    job_id = _job_in(db, frm)
    with db.begin() as s:
        job = s.get(Job, job_id)
        if (frm, to) in EXPECTED_ALLOWED:
            event = transition(s, job, to, error=JobError("x", "y") if to is F else None)
            assert job.status == to.value
            assert event.data == {"from": frm.value, "to": to.value, "attempt": job.attempt}
        else:
            with pytest.raises(IllegalTransition):
                transition(s, job, to)
    with db.session() as s:  # what was committed
        expected = to if (frm, to) in EXPECTED_ALLOWED else frm
        assert s.get(Job, job_id).status == expected.value


def test_running_counts_attempts_and_sets_lease(db):
    job_id = _job_in(db, Q)
    with db.begin() as s:
        job = s.get(Job, job_id)
        transition(s, job, R, worker_id="w1", lease_s=30)
        assert job.attempt == 1 and job.worker_id == "w1"
        assert job.lease_expires_at > utcnow() + timedelta(seconds=25)
        transition(s, job, Q, message="requeued")
        assert job.lease_expires_at is None and job.worker_id is None and job.enqueued_at is None
        transition(s, job, R, worker_id="w2", lease_s=30)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert (job.attempt, job.worker_id, job.status) == (2, "w2", "running")


def test_terminal_states_record_end_error_and_close_stages(db):
    job_id = _job_in(db, R)
    with db.begin() as s:
        job = s.get(Job, job_id)
        job.stages = {"svd": {"status": "running", "seconds": 1.0}}
        s.flush()
        transition(s, job, F, error=JobError("numerical_error", "nan in layer 3", "svd"))
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.finished_at is not None and job.lease_expires_at is None
        assert (job.error_code, job.error_message, job.error_stage) == ("numerical_error", "nan in layer 3", "svd")
        assert job.stages["svd"]["status"] == "failed"
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        assert [e.data["to"] for e in events] == ["queued", "running", "failed"]
        assert events[-1].level == "error"


def test_cancel_of_queued_job_sets_cancel_time(db):
    job_id = _job_in(db, Q)
    with db.begin() as s:
        job = s.get(Job, job_id)
        transition(s, job, CD)
        assert job.cancel_requested_at is not None and job.finished_at is not None


def test_compare_and_set_refuses_a_stale_read(db):
    """Two sessions read `running`; the first to commit wins, the second gets StaleTransition."""
    job_id = _job_in(db, R)
    first, second = db.session(), db.session()
    try:
        a, b = first.get(Job, job_id), second.get(Job, job_id)
        second.commit()  # end b's read transaction, keep the stale object (expire_on_commit=False)
        transition(first, a, CI)
        first.commit()
        with pytest.raises(StaleTransition):
            transition(second, b, S)
        second.rollback()
    finally:
        first.close()
        second.close()
    with db.session() as s:
        assert s.get(Job, job_id).status == "cancelling"


def test_recover_orphans(db):
    """Expired leases are requeued until max_attempts, then failed; pending cancels complete."""
    ids = {name: _job_in(db, st) for name, st in
           [("fresh", R), ("expired", R), ("exhausted", R), ("cancelling", CI), ("unqueued", Q)]}
    past = utcnow() - timedelta(seconds=5)
    with db.begin() as s:
        for name in ("expired", "exhausted", "cancelling"):
            s.get(Job, ids[name]).lease_expires_at = past
        s.get(Job, ids["exhausted"]).attempt = 3
    with db.begin() as s:
        found = recover_orphans(s, max_attempts=3)
    assert found.requeued == [ids["expired"]]
    assert found.failed == [ids["exhausted"]]
    assert found.cancelled == [ids["cancelling"]]
    assert set(found.unqueued) == {ids["unqueued"]}
    with db.session() as s:
        assert s.get(Job, ids["fresh"]).status == "running"
        assert s.get(Job, ids["exhausted"]).error_code == "worker_lost"
    with db.begin() as s:  # at embedded start-up every running job is an orphan, lease or not
        found = recover_orphans(s, max_attempts=3, everything_active=True)
    assert found.requeued == [ids["fresh"]]

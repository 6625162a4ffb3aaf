"""Job operations shared by the API, the worker and the embedded runner.

Status changes go through `svdforge.persistence.state.transition`; this module creates jobs,
appends events and finds the jobs that need a (re)queue after a crash.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from svdforge.persistence.ids import new_id
from svdforge.persistence.state import JobError, JobStatus, StaleTransition, transition
from svdforge.persistence.tables import Job, JobEvent, utcnow

# The public API's path prefix (every route but the health probes): the API mounts its routers
# under it and the worker writes job links (a report's figure URLs) with it.
API_PREFIX = "/v1"


def request_hash(request: dict[str, Any]) -> str:
    """Canonical hash of a validated request: the Idempotency-Key compares these."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def artifact_prefix(job_id: str, attempt: int | None = None) -> str:
    """Where a job's files are stored; each attempt writes under its own folder, so a worker
    cleaning up a stale attempt never touches the files of the attempt that replaced it."""
    return f"artifacts/{job_id}" if attempt is None else f"artifacts/{job_id}/{attempt}"


def create_job(session: Session, owner_id: str, request: dict[str, Any], *,
               idempotency_key: str | None = None, now: datetime | None = None) -> Job:
    """Insert a queued job and its first event (the caller commits, then enqueues)."""
    now = now or utcnow()
    job = Job(id=new_id("job"), owner_id=owner_id, status=JobStatus.QUEUED.value, model=request["model"],
              request=request, meta=request.get("metadata") or {}, stages={}, attempt=0, progress=0.0,
              idempotency_key=idempotency_key, request_hash=request_hash(request),
              created_at=now, updated_at=now)
    session.add(job)
    session.add(JobEvent(job_id=job.id, created_at=now, type="status", message="job queued",
                         data={"from": None, "to": JobStatus.QUEUED.value, "attempt": 0}))
    return job


def add_event(session: Session, job_id: str, type_: str, *, message: str = "", stage: str | None = None,
              level: str = "info", data: dict[str, Any] | None = None, now: datetime | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, created_at=now or utcnow(), type=type_, message=message[:10_000],
                     stage=stage, level=level, data=data)
    session.add(event)
    return event


def get_owned_job(session: Session, job_id: str, owner_id: str) -> Job | None:
    """The job if it exists and belongs to `owner_id` (anything else looks like a 404)."""
    job = session.get(Job, job_id)
    return job if job is not None and job.owner_id == owner_id else None


@dataclass
class Recovery:
    requeued: list[str] = field(default_factory=list)  # need a new queue message
    unqueued: list[str] = field(default_factory=list)  # committed but never enqueued
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


def recover_orphans(session: Session, *, max_attempts: int, everything_active: bool = False,
                    now: datetime | None = None) -> Recovery:
    """Find jobs whose worker is gone and put them back on track (the caller commits).

    A running job whose lease expired (or every running job, when the caller knows no
    worker is alive, as the embedded mode does at start) is requeued until it has used
    `max_attempts`, then failed with `worker_lost`; a job that was being cancelled is
    cancelled; a queued job that was committed but never enqueued is reported so that the
    caller sends its message. The caller also removes the artifacts of cancelled and failed
    jobs. Each change is conditional on the lease that was seen to expire, so a worker that
    renews its lease meanwhile keeps its job, and two reapers sweeping at once each change
    a job at most once between them.
    """
    now = now or utcnow()
    out = Recovery()
    active = session.scalars(select(Job).where(Job.status.in_([JobStatus.RUNNING.value,
                                                               JobStatus.CANCELLING.value]))).all()
    for job in active:
        expired = job.lease_expires_at is None or job.lease_expires_at <= now
        if not (everything_active or expired):
            continue
        lease = None if everything_active else now
        try:
            if job.status == JobStatus.CANCELLING:
                transition(session, job, JobStatus.CANCELLED, message="cancelled (its worker was lost)", now=now,
                           lease_expired_by=lease)
                out.cancelled.append(job.id)
            elif job.attempt >= max_attempts:
                transition(session, job, JobStatus.FAILED, now=now, lease_expired_by=lease, error=JobError(
                    "worker_lost", f"the worker running this job was lost {job.attempt} times "
                    f"(max_attempts {max_attempts}); the job is not retried again", job.stage))
                out.failed.append(job.id)
            else:
                transition(session, job, JobStatus.QUEUED, now=now, lease_expired_by=lease,
                           message=f"requeued: the worker of attempt {job.attempt} was lost "
                                   f"({job.worker_id}, lease expired)")
                out.requeued.append(job.id)
        except StaleTransition:  # renewed, ended or reaped by someone else since it was read
            continue
    out.unqueued = list(session.scalars(select(Job.id).where(
        Job.status == JobStatus.QUEUED.value, Job.enqueued_at.is_(None), Job.id.not_in(out.requeued))))
    return out


def claim_sends(session: Session, *, now: datetime | None = None, grace_s: float = 0.0,
                resend_after_s: float | None = None) -> list[str]:
    """Queued jobs that need a queue message, marked as sent (`enqueued_at = now`; the caller
    commits, then sends, and clears the mark of a send that failed).

    That is every queued job never enqueued: a requeued one at once, one the API accepted
    (its send failed, or the API died) once `grace_s` has passed since it was created, so
    that the API's own send is not doubled; and, with `resend_after_s`, every queued job whose message was sent that
    long ago without it starting (a broker that lost its messages). The mark is a conditional
    UPDATE, so concurrent reapers do not both send. A duplicate message is harmless anyway:
    the claim runs a job only if it is queued.
    """
    now = now or utcnow()
    due = [Job.enqueued_at.is_(None)]
    if resend_after_s is not None:
        due.append(Job.enqueued_at <= now - timedelta(seconds=resend_after_s))
    candidates = session.execute(select(Job.id, Job.enqueued_at).where(
        Job.status == JobStatus.QUEUED.value, or_(*due),
        or_(Job.enqueued_at.is_not(None), Job.attempt > 0, Job.created_at <= now - timedelta(seconds=grace_s)))
        .order_by(Job.created_at)).all()
    sent = []
    for job_id, enqueued_at in candidates:
        same = Job.enqueued_at.is_(None) if enqueued_at is None else Job.enqueued_at == enqueued_at
        n = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, same)
                            .values(enqueued_at=now), execution_options={"synchronize_session": False}).rowcount
        if n == 1:
            sent.append(job_id)
    return sent


def unmark_sent(session: Session, job_ids: list[str], marked_at: datetime) -> None:
    """Undo `claim_sends` for messages that could not be sent (the next sweep tries again)."""
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED.value,
                                          Job.enqueued_at == marked_at).values(enqueued_at=None),
                        execution_options={"synchronize_session": False})

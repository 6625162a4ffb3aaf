"""Job operations shared by the API, the worker and the embedded runner.

Status changes go through `persistence.state.transition`; this module creates jobs,
appends events and finds the jobs that need a (re)queue after a crash.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from persistence.ids import new_id
from persistence.models import Job, JobEvent, utcnow
from persistence.state import JobError, JobStatus, transition


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
    caller sends its message. The caller also removes the artifacts of cancelled jobs.
    """
    now = now or utcnow()
    out = Recovery()
    active = session.scalars(select(Job).where(Job.status.in_([JobStatus.RUNNING.value,
                                                               JobStatus.CANCELLING.value]))).all()
    for job in active:
        expired = job.lease_expires_at is None or job.lease_expires_at <= now
        if not (everything_active or expired):
            continue
        if job.status == JobStatus.CANCELLING:
            transition(session, job, JobStatus.CANCELLED, message="cancelled (its worker was lost)", now=now)
            out.cancelled.append(job.id)
        elif job.attempt >= max_attempts:
            transition(session, job, JobStatus.FAILED, now=now, error=JobError(
                "worker_lost", f"the worker running this job was lost {job.attempt} times", job.stage))
            out.failed.append(job.id)
        else:
            transition(session, job, JobStatus.QUEUED, message="requeued: its worker was lost", now=now)
            out.requeued.append(job.id)
    out.unqueued = list(session.scalars(select(Job.id).where(
        Job.status == JobStatus.QUEUED.value, Job.enqueued_at.is_(None), Job.id.not_in(out.requeued))))
    return out

"""The job state machine. `transition` is the only code that changes `Job.status`.

    queued ──> running ──> succeeded
      │          │ ├────> failed
      │          │ └────> cancelling ──> cancelled
      │          │                  └──> failed      (an error beat the cancel check)
      │          └──> queued                         (requeued: its worker was lost)
      └──> cancelled                                 (cancelled before it started)

Every change is a compare-and-set (`UPDATE ... WHERE status = <what we read> AND attempt =
<what we read>`), so the API cancelling and the worker finishing can race without either
overwriting the other: the loser gets `StaleTransition`, re-reads and decides again. Taking
a job (`queued -> running`, attempt + 1) is therefore one atomic conditional UPDATE: of two
workers that read the same queued job, exactly one gets it. A reaper's requeue also names
the lease it saw expire (`lease_expired_by`), so a heartbeat that lands first wins.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

# The vocabulary lives in `status` (the job's public JSON and the webhook outbox use it too);
# it is imported from here as before.
from svdforge.persistence.status import ACTIVE, ALLOWED, TERMINAL, JobStatus, Stage
from svdforge.persistence.tables import Job, JobEvent, utcnow
from svdforge.persistence.webhooks import add_deliveries

__all__ = ["ACTIVE", "ALLOWED", "TERMINAL", "IllegalTransition", "JobError", "JobStatus", "Stage",
           "StaleTransition", "can_transition", "transition"]


class IllegalTransition(Exception):
    """The state machine does not allow this change (a bug in the caller, or a 409)."""

    def __init__(self, frm: str, to: str) -> None:
        super().__init__(f"job cannot go from {frm} to {to}")
        self.frm, self.to = frm, to


class StaleTransition(Exception):
    """The row's status changed since it was read: re-read and decide again."""


@dataclass(frozen=True)
class JobError:
    code: str  # invalid_input | target_unmet | numerical_error | internal_error | worker_lost
    message: str
    stage: str | None = None


def can_transition(frm: str, to: str) -> bool:
    return JobStatus(to) in ALLOWED[JobStatus(frm)]


def transition(session: Session, job: Job, to: JobStatus, *, error: JobError | None = None,
               worker_id: str | None = None, lease_s: float | None = None, message: str = "",
               now: datetime | None = None, lease_expired_by: datetime | None = None) -> JobEvent:
    """Move `job` to `to` (compare-and-set on the status read), and log a `status` event.

    Sets what belongs to the new state: the attempt counter and lease when a worker
    takes the job, the finish time and the error when it ends, the cancel request time.
    Queues the webhook deliveries of the change (`webhooks.add_deliveries`) in the same
    transaction. The caller commits. Raises IllegalTransition or StaleTransition (also when
    `lease_expired_by` is given and the row's lease runs past it: the worker renewed it).
    """
    frm = JobStatus(job.status)
    if to not in ALLOWED[frm]:
        raise IllegalTransition(frm, to)
    now = now or utcnow()
    values: dict = {"status": to.value, "updated_at": now}
    if to is JobStatus.RUNNING:
        values.update(attempt=job.attempt + 1, worker_id=worker_id, stage=None, progress=0.0, stages={},
                      started_at=job.started_at or now,
                      lease_expires_at=now + timedelta(seconds=lease_s) if lease_s else None)
    elif to is JobStatus.QUEUED:
        values.update(worker_id=None, lease_expires_at=None, stage=None, progress=0.0, enqueued_at=None)
    elif to is JobStatus.CANCELLING:
        values.update(cancel_requested_at=now)
    if to in TERMINAL:  # the checkpoint pointer goes too: its files are deleted with the job's others
        values.update(finished_at=now, lease_expires_at=None, checkpoint=None, stages=_close_stages(job.stages, to))
        if to is JobStatus.CANCELLED and job.cancel_requested_at is None:
            values["cancel_requested_at"] = now
        if to is JobStatus.SUCCEEDED:
            values.update(stage=None, progress=1.0)
    if error is not None:
        values.update(error_code=error.code, error_message=error.message, error_stage=error.stage)

    where = [Job.id == job.id, Job.status == frm.value, Job.attempt == job.attempt]
    if lease_expired_by is not None:
        where.append(or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= lease_expired_by))
    result = session.execute(update(Job).where(*where).values(**values),
                             execution_options={"synchronize_session": False})
    if result.rowcount != 1:
        raise StaleTransition(f"job {job.id} is no longer {frm} (attempt {job.attempt})")
    for key, value in values.items():  # the object now mirrors the row, without another UPDATE
        set_committed_value(job, key, value)
    add_deliveries(session, job, to.value, now)  # the webhook outbox: committed with the change, or not at all
    event = JobEvent(job_id=job.id, created_at=now, type="status", stage=job.stage,
                     level="error" if to is JobStatus.FAILED else "info",
                     message=message or f"{frm} -> {to}",
                     data={"from": frm.value, "to": to.value, "attempt": values.get("attempt", job.attempt)})
    session.add(event)
    return event


def _close_stages(stages: dict | None, to: JobStatus) -> dict:
    """A stage still marked running when the job ends gets the job's end state."""
    closed = {}
    for name, info in (stages or {}).items():
        info = dict(info)
        if info.get("status") == "running":
            info["status"] = {JobStatus.SUCCEEDED: "completed", JobStatus.FAILED: "failed",
                              JobStatus.CANCELLED: "cancelled"}[to]
        closed[name] = info
    return closed

"""Webhooks: secrets, Standard Webhooks signatures, and the delivery outbox.

When a job's status changes, `state.transition` calls `add_deliveries` in the same
transaction: one `WebhookDelivery` row per webhook of the job's owner that asked for the
event, carrying the body as it will be sent. Nothing is lost if a process dies after the
commit; nothing is sent for a change that was rolled back. A dispatcher
(`svdforge.worker.webhooks`) then claims due rows (`claim_due`: a compare-and-set on the
row's lease), sends them and records each attempt (`record_attempt`: succeeded on a 2xx,
else rescheduled by the retry schedule, or failed once it is used up).

Signatures follow the Standard Webhooks spec: `webhook-signature: v1,<base64 HMAC-SHA256 of
"<webhook-id>.<webhook-timestamp>.<body>">`, keyed with the base64-decoded part of the
secret after `whsec_`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from svdforge.persistence.ids import new_id
from svdforge.persistence.status import JobStatus
from svdforge.persistence.tables import Job, Webhook, WebhookDelivery
from svdforge.persistence.views import job_document

# The job statuses that are events, and their names.
EVENTS = {JobStatus.RUNNING.value: "job.running", JobStatus.SUCCEEDED.value: "job.succeeded",
          JobStatus.FAILED.value: "job.failed", JobStatus.CANCELLED.value: "job.cancelled"}
EVENT_TYPES = tuple(EVENTS.values())
DEFAULT_EVENTS = ("job.succeeded", "job.failed", "job.cancelled")

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MAX_ERROR_CHARS = 500


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON, the same on every retry."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def add_deliveries(session: Session, job: Job, status: str, now: datetime) -> list[WebhookDelivery]:
    """Queue the event of `job` reaching `status` for each webhook of its owner that wants it
    (the caller's transaction commits them with the job's change). `job` already shows the change."""
    type_ = EVENTS.get(status)
    if type_ is None:
        return []
    hooks = [h for h in session.scalars(select(Webhook).where(Webhook.owner_id == job.owner_id)) if type_ in h.events]
    if not hooks:
        return []
    payload = {"type": type_, "timestamp": to_jsonable_python(now), "data": job_document(job)}
    rows = [WebhookDelivery(id=new_id("msg"), webhook_id=h.id, job_id=job.id, type=type_, payload=payload,
                            status=PENDING, attempts=0, next_attempt_at=now, history=[], created_at=now)
            for h in hooks]
    session.add_all(rows)
    return rows


@dataclass
class Claim:
    """A delivery a dispatcher holds until `lease` (what it needs to send and to record)."""

    id: str
    webhook_id: str
    url: str
    secret: str
    payload: dict[str, Any]
    attempts: int
    lease: datetime
    history: list[dict[str, Any]] = field(default_factory=list)


def due_ids(session: Session, now: datetime, limit: int) -> list[tuple[str, datetime | None]]:
    """Pending deliveries whose next attempt is due and that nobody holds (a read: no write lock)."""
    return [tuple(r) for r in session.execute(
        select(WebhookDelivery.id, WebhookDelivery.lease_expires_at)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now,
               or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at <= now))
        .order_by(WebhookDelivery.next_attempt_at).limit(limit))]


def claim_due(session: Session, candidates: list[tuple[str, datetime | None]], now: datetime,
              lease_s: float) -> list[Claim]:
    """Take each candidate whose lease is still the one read (the caller commits): of two
    dispatchers that read the same row, exactly one gets it."""
    lease = now + timedelta(seconds=lease_s)
    taken = []
    for delivery_id, seen in candidates:
        same = WebhookDelivery.lease_expires_at.is_(None) if seen is None else WebhookDelivery.lease_expires_at == seen
        n = session.execute(update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING, same)
            .values(lease_expires_at=lease), execution_options={"synchronize_session": False}).rowcount
        if n == 1:
            taken.append(delivery_id)
    if not taken:
        return []
    rows = session.execute(select(WebhookDelivery, Webhook).join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                           .where(WebhookDelivery.id.in_(taken))).all()
    return [Claim(d.id, w.id, w.url, w.secret, d.payload, d.attempts, lease, list(d.history or []))
            for d, w in rows]


@dataclass(frozen=True)
class Attempt:
    """What one attempt got: an HTTP status, or an error before any (connection, timeout, refused URL)."""

    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def record_attempt(session: Session, claim: Claim, attempt: Attempt, schedule: list[float]) -> str | None:
    """Write the attempt and what comes next (the caller commits); returns the delivery's status,
    or None when the claim was lost (its lease ran out and another dispatcher took it, or the
    webhook was deleted meanwhile)."""
    attempts = claim.attempts + 1
    error = None if attempt.error is None else attempt.error[:MAX_ERROR_CHARS]
    values: dict[str, Any] = {"attempts": attempts, "last_attempt_at": attempt.at, "lease_expires_at": None,
                              "last_status_code": attempt.status_code, "last_error": error,
                              "history": [*claim.history, {"at": to_jsonable_python(attempt.at),
                                                           "status_code": attempt.status_code, "error": error,
                                                           "duration_ms": attempt.duration_ms}]}
    if attempt.ok:
        values.update(status=SUCCEEDED, next_attempt_at=None, delivered_at=attempt.at)
    elif attempts <= len(schedule):
        values.update(status=PENDING, next_attempt_at=attempt.at + timedelta(seconds=schedule[attempts - 1]))
    else:
        values.update(status=FAILED, next_attempt_at=None)
    n = session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == claim.id, WebhookDelivery.lease_expires_at == claim.lease).values(**values),
        execution_options={"synchronize_session": False}).rowcount
    return values["status"] if n == 1 else None

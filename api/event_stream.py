"""A job's events as Server-Sent Events (`GET /v1/jobs/{id}/events`, `Accept: text/event-stream`).

Each message is one item of the JSON list endpoint: `id: evt_<n>`, `event: <its type>`,
`data: <the item, as JSON on one line>`. The stream ends after the job's final status event
(to succeeded, failed or cancelled); for a job that has already ended, after the events
left to send. A client resumes with `Last-Event-ID` (or `after`): the ids are the list's.

New events are read from the database by polling, every `Settings.sse_poll_s`, each read
in its own short session on a worker thread: the same code follows a job of the embedded
queue and of the Redis/PostgreSQL topology, and nothing (no session, no connection) is held
while the stream waits. A client that goes away cancels the generator at its next wait;
a read in progress finishes on its thread first and closes its session.
"""
from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import anyio.to_thread
from sqlalchemy import and_, select
from sse_starlette import EventSourceResponse, ServerSentEvent

from svdforge.api.problems import field_error
from svdforge.api.routes.common import event_out
from svdforge.persistence.db import Database
from svdforge.persistence.settings import Settings
from svdforge.persistence.state import TERMINAL, JobStatus
from svdforge.persistence.tables import Job, JobEvent

EVENT_STREAM = "text/event-stream"
BATCH = 500  # events per read; a full batch is followed by the next read at once
_EVENT_ID = re.compile(r"evt_(\d{1,18})")
_TERMINAL = frozenset(s.value for s in TERMINAL)
_open = 0  # generators running now (a disconnected client's must end: tests check it)

OPENAPI_CONTENT = {EVENT_STREAM: {"schema": {"type": "string"}, "example": (
    'id: evt_7\nevent: status\ndata: {"object":"job.event","id":"evt_7","type":"status",...}\n\n')}}
OPENAPI_DESCRIPTION = (
    "With `Accept: text/event-stream`: the same events as Server-Sent Events, live. Each message has "
    "`id: evt_<n>`, `event: <type>` and `data: <the event object as JSON>`; comment lines keep the "
    "connection alive. The stream ends after the job's final status event (succeeded, failed, "
    "cancelled). Resume after a disconnect with the `Last-Event-ID` header (or `after`).")


def open_streams() -> int:
    """How many event streams are being served now (by this process)."""
    return _open


def wants_event_stream(accept: str | None) -> bool:
    """Whether the Accept header prefers text/event-stream to JSON (q-values respected)."""
    if not accept:
        return False
    sse_q, json_q = 0.0, 0.0
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == EVENT_STREAM:
            sse_q = max(sse_q, q)
        elif media in ("application/json", "application/*", "*/*"):
            json_q = max(json_q, q)
    return sse_q > 0 and sse_q >= json_q


def parse_event_id(value: str, field: str) -> int:
    """`evt_42` -> 42; anything else is a 422 naming `field`."""
    m = _EVENT_ID.fullmatch(value.strip())
    if not m:
        raise field_error(field, "must be an event id like evt_42")
    return int(m.group(1))


def _is_final(event: JobEvent) -> bool:
    return event.type == "status" and isinstance(event.data, dict) and event.data.get("to") in _TERMINAL


def read_batch(db: Database, job_id: str, after: int, limit: int = BATCH) -> tuple[list[dict], bool]:
    """The job's next events after id `after` as list items, and whether the stream is done.

    One statement reads the job's status with its events (an outer join: a row with no event
    when there is none), so both come from one snapshot: the final status event commits with
    the status, so a job seen ended has all of its events in the same read.
    """
    q = (select(Job.status, JobEvent).select_from(Job)
         .outerjoin(JobEvent, and_(JobEvent.job_id == Job.id, JobEvent.id > after))
         .where(Job.id == job_id).order_by(JobEvent.id).limit(limit))
    with db.session() as s:
        rows = s.execute(q).all()
        status, items = (rows[0][0] if rows else None), []
        for _, event in rows:
            if event is None:
                break
            items.append(event_out(event).model_dump(mode="json"))
            if _is_final(event):
                return items, True
    ended = status is None or JobStatus(status) in TERMINAL  # no row at all: the job was deleted
    return items, ended and len(items) < limit


async def follow(db: Database, job_id: str, after: int, poll_s: float) -> AsyncIterator[ServerSentEvent]:
    """The stream's messages: every event after `after`, until the job's final status event."""
    global _open
    _open += 1
    try:
        while True:
            items, done = await anyio.to_thread.run_sync(read_batch, db, job_id, after)
            for item in items:
                yield ServerSentEvent(json.dumps(item, ensure_ascii=False, separators=(",", ":")),
                                      event=item["type"], id=item["id"], sep="\n")
            if items:
                after = int(items[-1]["id"][4:])
            if done:
                return
            if len(items) < BATCH:
                await anyio.sleep(poll_s)
    finally:
        _open -= 1


def event_stream(db: Database, settings: Settings, job_id: str, after: int) -> EventSourceResponse:
    """The response; the caller has checked that the job is the caller's, and closed its session."""
    return EventSourceResponse(follow(db, job_id, after, settings.sse_poll_s), ping=settings.sse_keepalive_s,
                               sep="\n", headers={"Vary": "Accept"})

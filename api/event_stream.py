"""A job's events as Server-Sent Events (`GET /v1/jobs/{id}/events`, `Accept: text/event-stream`).

Each message is one item of the JSON list endpoint: `id: evt_<n>`, `event: <its type>`,
`data: <the item, as JSON on one line>`. The stream ends after the job's final status event
(to succeeded, failed or cancelled); for a job that has already ended, after the events
left to send. A client resumes with `Last-Event-ID` (or `after`): the ids are the list's.

A stream first reads its job's events itself (it starts at once); then one `Poller` per
app reads the new events of ALL followed jobs every `Settings.sse_poll_s`, in one statement
and one short session on a worker thread, and hands each stream its own: 50 followers cost
one read per interval, not 50. The same code follows a job of the embedded queue and of the
Redis/PostgreSQL topology, and nothing (no session, no connection) is held while a stream
waits. A client that goes away cancels its generator at its next wait, which unregisters
it; the poller's task ends with the last stream (a read in progress finishes on its thread
first and closes its session) and at the app's shutdown.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio.to_thread
from sqlalchemy import and_, case, select
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



def read_new(db: Database, cursors: dict[str, int], limit: int = BATCH) -> tuple[dict, dict[str, str], bool]:
    """Every followed job's events after its cursor, and the jobs' statuses, in ONE statement.

    `cursors` maps a job id to the smallest id its streams have seen. Returns the events by
    job (each as `(item, is_final)`, oldest first), the status of each job that still exists,
    and whether the read was cut (at `limit` rows, plus one a job). Rows are ordered by event id, so a cut
    read holds, for each job, the oldest of its new events (nothing skipped); a job with no
    new event comes as one row without an event. As in `read_batch`, the statuses and the
    events come from one snapshot, and a read that was not cut has a row for every job that
    exists (none: deleted).
    """
    after = case(cursors, value=Job.id)  # each job's own cursor, inside the join
    q = (select(Job.id, Job.status, JobEvent).select_from(Job)
         .outerjoin(JobEvent, and_(JobEvent.job_id == Job.id, JobEvent.id > after))
         .where(Job.id.in_(list(cursors))).order_by(JobEvent.id).limit(limit + len(cursors)))
    events: dict[str, list[tuple[dict, bool]]] = {}
    statuses: dict[str, str] = {}
    with db.session() as s:
        rows = s.execute(q).all()
        for job_id, status, event in rows:
            statuses[job_id] = status
            if event is not None:
                events.setdefault(job_id, []).append((event_out(event).model_dump(mode="json"), _is_final(event)))
    return events, statuses, len(rows) == limit + len(cursors)


@dataclass(eq=False)
class Follower:
    """One stream's place in the poller: its job, the last event id handed to it, what waits."""

    job_id: str
    after: int
    pending: list[dict] = field(default_factory=list)
    done: bool = False  # the job ended (or is gone): the stream ends after `pending`
    error: BaseException | None = None  # the poll failed: the stream fails, as a failed read did
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, rows: list[tuple[dict, bool]], ended: bool) -> None:
        """Take this poll's events of the job (those after `after` only), then whether it ended."""
        for item, final in rows:
            event_id = int(item["id"][4:])
            if event_id <= self.after:
                continue  # another stream of the same job had an older cursor
            self.pending.append(item)
            self.after = event_id
            if final:
                self.done = True
                break
        self.done = self.done or ended
        if self.pending or self.done:
            self.wake.set()


class Poller:
    """The one reader of new events for every stream of an app (`app.state.event_poller`).

    Every `poll_s` it reads the new events of all followed jobs in one statement
    (`read_new`), in one short session on a worker thread, and hands each stream its own
    (`Follower.deliver`). A read cut at `BATCH` events is followed by the next at once. The
    task starts with the first stream and ends with the last one (or at shutdown, `close`).
    A stream that registers while a read is running is not in it: only the followers taken
    when a read starts get its rows, so each sees every event after its cursor exactly once.
    """

    def __init__(self, db: Database, poll_s: float) -> None:
        self.db, self.poll_s = db, poll_s
        self.followers: set[Follower] = set()
        self.rounds = 0  # reads started (tests count statements against it)
        self._task: asyncio.Task | None = None

    def register(self, job_id: str, after: int) -> Follower:
        follower = Follower(job_id, after)
        self.followers.add(follower)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name="svdforge-event-poller")
        return follower

    def unregister(self, follower: Follower) -> None:
        self.followers.discard(follower)
        if not self.followers and self._task is not None:
            self._task.cancel()  # a read in progress finishes on its thread and closes its session
            self._task = None

    async def close(self) -> None:
        """At shutdown: stop the task and end the streams still waiting (their clients resume)."""
        task, self._task = self._task, None
        for follower in self.followers:
            follower.done = True
            follower.wake.set()
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        again = False
        while self.followers:
            if not again:
                await asyncio.sleep(self.poll_s)  # each stream has just read, before it registered
            again = await self.poll_once()

    async def poll_once(self) -> bool:
        """One read for every stream registered now; True when it was cut (read again at once)."""
        batch = [f for f in self.followers if not f.done]
        if not batch:
            return False
        cursors: dict[str, int] = {}
        for f in batch:
            cursors[f.job_id] = min(f.after, cursors.get(f.job_id, f.after))
        self.rounds += 1
        try:
            events, statuses, cut = await anyio.to_thread.run_sync(read_new, self.db, cursors)
        except Exception as exc:  # noqa: BLE001 - each stream fails with it, as its own read did
            for f in batch:
                f.error = exc
                f.wake.set()
            return False
        for f in batch:
            if f in self.followers:  # one that went away during the read gets nothing
                status = statuses.get(f.job_id)
                ended = not cut and (status is None or JobStatus(status) in TERMINAL)
                f.deliver(events.get(f.job_id, []), ended)
        return cut


def _message(item: dict) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(item, ensure_ascii=False, separators=(",", ":")),
                           event=item["type"], id=item["id"], sep="\n")


async def follow(poller: Poller, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    """The stream's messages: every event after `after`, until the job's final status event.

    The first reads are the stream's own (it starts at once, and catches up in full batches);
    then it registers with the poller and waits for what the poller hands it.
    """
    global _open
    _open += 1
    follower = None
    try:
        while True:
            items, done = await anyio.to_thread.run_sync(read_batch, poller.db, job_id, after)
            for item in items:
                yield _message(item)
            if items:
                after = int(items[-1]["id"][4:])
            if done:
                return
            if len(items) < BATCH:
                break
        follower = poller.register(job_id, after)
        while True:
            await follower.wake.wait()
            follower.wake.clear()
            items, follower.pending = follower.pending, []
            for item in items:
                yield _message(item)
            if follower.error is not None:
                raise follower.error
            if follower.done:
                return
    finally:
        if follower is not None:
            poller.unregister(follower)
        _open -= 1


def event_stream(poller: Poller, settings: Settings, job_id: str, after: int) -> EventSourceResponse:
    """The response; the caller has checked that the job is the caller's, and closed its session."""
    return EventSourceResponse(follow(poller, job_id, after), ping=settings.sse_keepalive_s,
                               sep="\n", headers={"Vary": "Accept"})

"""GET /v1/jobs/{id}/events as Server-Sent Events, on events written straight into the
database: the same items as the JSON list, resuming, the end after the final status,
keep-alives, authorization, a disconnect that leaves no generator and no connection, and
one poller per app: one read per interval for all the streams, none lost or repeated."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import event, select

from svdforge.api import event_stream
from svdforge.api.main import create_app
from svdforge.persistence import jobs as jobs_repo
from svdforge.persistence.state import JobStatus, transition
from svdforge.persistence.tables import ApiKey, Job

from .conftest import make_settings
from .sse import events_of, live_server, messages

SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, sse_poll_s=0.05, sse_keepalive_s=0.2)


@pytest.fixture
def base(settings, db):
    with live_server(create_app(settings)) as url:
        yield url


@pytest.fixture
def http(base, auth):
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        yield c


def new_job(db, owner: str = "alice") -> str:
    with db.begin() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.name == owner))
        return jobs_repo.create_job(s, key.id, {"model": "m", "ratio": 0.4}).id


def move(db, job_id: str, to: JobStatus) -> None:
    with db.begin() as s:
        transition(s, s.get(Job, job_id), to, worker_id="w", lease_s=60)


def progress(db, job_id: str, n: int) -> None:
    with db.begin() as s:
        for i in range(n):
            jobs_repo.add_event(s, job_id, "progress", stage="svd", data={"i": i, "text": "a\nb"})


def finished_job(db) -> str:
    job_id = new_job(db)
    move(db, job_id, JobStatus.RUNNING)
    progress(db, job_id, 5)
    move(db, job_id, JobStatus.SUCCEEDED)
    return job_id


def test_a_finished_job_streams_the_list_items_and_closes(http, db):
    job_id = finished_job(db)
    listed = http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store"
        got = events_of(r)  # returns: the server closed the stream
    assert [m.id for m in got] == [e["id"] for e in listed]
    assert [m.event for m in got] == [e["type"] for e in listed]
    assert [m.json for m in got] == listed  # each data line is one list item, byte for byte the same JSON
    assert all(len(m.data) == 1 for m in got)  # a message's newline stays escaped inside the JSON
    assert got[-1].event == "status" and got[-1].json["data"]["to"] == "succeeded"


def test_resume_gives_exactly_the_rest(http, db):
    job_id = finished_job(db)
    ids = [e["id"] for e in http.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    url = f"/v1/jobs/{job_id}/events"
    for headers, params in (({"Last-Event-ID": ids[2]}, {}), ({}, {"after": ids[2]}),
                            ({"Last-Event-ID": ids[2]}, {"after": ids[0]})):  # the header wins over `after`
        with http.stream("GET", url, headers={**SSE, **headers}, params=params) as r:
            assert [m.id for m in events_of(r)] == ids[3:], (headers, params)
    with http.stream("GET", url, headers={**SSE, "Last-Event-ID": ids[-1]}) as r:
        assert r.status_code == 200 and events_of(r) == []  # after the final event: nothing, and it closes


def test_a_live_stream_follows_new_events_and_ends_at_the_final_status(http, db):
    job_id = new_job(db)
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE) as r:
        stream = messages(r.iter_lines())
        first = next(m for m in stream if m.event)
        assert first.json["data"]["to"] == "queued"

        def work():
            move(db, job_id, JobStatus.RUNNING)
            for _ in range(3):
                progress(db, job_id, 2)
                time.sleep(0.1)
            move(db, job_id, JobStatus.CANCELLING)
            move(db, job_id, JobStatus.CANCELLED)

        writer = threading.Thread(target=work)
        writer.start()
        rest = [m for m in stream if m.event]
        writer.join()
    ids = [int(m.id[4:]) for m in [first, *rest]]
    assert ids == sorted(set(ids))  # strictly increasing
    assert [m.event for m in rest] == ["status"] + ["progress"] * 6 + ["status", "status"]
    assert rest[-1].json["data"]["to"] == "cancelled"
    listed = http.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [m.json for m in [first, *rest]] == listed  # no loss, no repeat


def test_keepalive_comments_while_nothing_happens(http, db):
    job_id = new_job(db)
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE) as r:
        stream = messages(r.iter_lines())
        assert next(stream).event == "status"
        keepalive = next(stream)  # nothing else is written: the next message is a comment (every 0.2 s here)
        assert keepalive.event is None and keepalive.data == [] and keepalive.comments


def test_a_disconnect_ends_the_generator_and_holds_no_connection(settings, db, auth):
    app = create_app(settings.model_copy(update={"sse_poll_s": 30.0}))  # the check below lands in the wait
    job_id = new_job(db)
    with live_server(app) as url, httpx.Client(base_url=url, headers=auth, timeout=30) as c:
        for _ in range(3):
            with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=SSE) as r:
                assert next(messages(r.iter_lines())).event == "status"
                assert app.state.db.engine.pool.checkedout() == 0  # none held while the stream waits
        deadline = time.monotonic() + 10
        while event_stream.open_streams() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert event_stream.open_streams() == 0
        assert app.state.db.engine.pool.checkedout() == 0
        assert app.state.db.write_engine.pool.checkedout() == 0


def test_malformed_ids_are_a_422_naming_them(http, db):
    job_id = new_job(db)
    for headers, params, name in (({"Last-Event-ID": "42"}, {}, "Last-Event-ID"),
                                  ({"Last-Event-ID": "evt_x"}, {}, "Last-Event-ID"),
                                  ({}, {"after": "nope"}, "after")):
        r = http.get(f"/v1/jobs/{job_id}/events", headers={**SSE, **headers}, params=params)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
        assert [e["field"] for e in r.json()["errors"]] == [name]
        assert name in r.json()["detail"]


def test_authorization_comes_before_any_stream(http, base, db, other_auth):
    job_id = new_job(db)
    r = http.get(f"/v1/jobs/{job_id}/events", headers={**SSE, **other_auth})
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = httpx.get(f"{base}/v1/jobs/{job_id}/events", headers=SSE)
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    r = http.get("/v1/jobs/job_nope/events", headers=SSE)
    assert r.status_code == 404


def test_without_asking_for_a_stream_the_list_is_json(http, db):
    job_id = finished_job(db)
    for accept in (None, "application/json", "*/*", "text/event-stream;q=0.5, application/json",
                   "text/event-stream;q=0"):
        headers = {"Accept": accept} if accept else {}
        r = http.get(f"/v1/jobs/{job_id}/events", headers={**headers, "Last-Event-ID": "ignored"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", accept
        assert r.json()["object"] == "list" and len(r.json()["data"]) == 8


@pytest.mark.parametrize(("accept", "stream"), [
    (None, False), ("", False), ("application/json", False), ("*/*", False), ("text/html", False),
    ("text/event-stream", True), ("TEXT/EVENT-STREAM", True), ("application/json;q=0.9, text/event-stream", True),
    ("text/event-stream;q=0.1, */*;q=0.5", False), ("text/event-stream;q=0", False),
    ("text/event-stream;q=bad", False), ("text/event-stream, application/json", True),
])
def test_accept_negotiation(accept, stream):
    assert event_stream.wants_event_stream(accept) is stream


def test_the_openapi_document_shows_the_stream(client):
    op = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    content = op["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/event-stream"}
    assert content["application/json"]["schema"]["$ref"].endswith("/JobEventList")
    assert "Last-Event-ID" in [p["name"] for p in op["parameters"] if p["in"] == "header"]
    assert "text/event-stream" in op["description"]


def test_read_batch_pages_and_says_when_the_stream_is_done(db, tokens):
    job_id = finished_job(db)  # 8 events, the last one the final status
    first, done = event_stream.read_batch(db, job_id, 0, limit=3)
    assert len(first) == 3 and not done
    after = int(first[-1]["id"][4:])
    rest, done = event_stream.read_batch(db, job_id, after, limit=100)
    assert len(rest) == 5 and done and rest[-1]["data"]["to"] == "succeeded"
    assert event_stream.read_batch(db, job_id, int(rest[-1]["id"][4:])) == ([], True)  # resumed past the end
    running = new_job(db)
    move(db, running, JobStatus.RUNNING)
    items, done = event_stream.read_batch(db, running, 0)
    assert [e["type"] for e in items] == ["status", "status"] and not done
    assert event_stream.read_batch(db, running, int(items[-1]["id"][4:])) == ([], False)  # waits for more
    assert event_stream.read_batch(db, "job_gone", 0) == ([], True)  # a deleted job ends its stream


def events_in_db(db, job_id: str) -> list[dict]:
    return event_stream.read_batch(db, job_id, 0)[0]


@contextmanager
def count_selects(engine, tag=lambda: None) -> Iterator[list]:
    """A list that gets `tag()` for each SELECT the engine runs (BEGIN and PRAGMA left out)."""
    seen: list = []

    def on_execute(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(tag())

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)


def test_the_poller_reads_all_streams_in_one_statement_and_loses_nothing_mid_poll(db, tokens):
    a, b, c = new_job(db), new_job(db), new_job(db)
    for job_id in (a, b, c):
        move(db, job_id, JobStatus.RUNNING)
    first_a = int(events_in_db(db, a)[0]["id"][4:])

    async def polled(poller, hook=None) -> bool:
        """One poll, checked to be one statement on the read engine."""
        with count_selects(db.engine) as selects:
            if hook:
                event.listen(db.engine, "before_cursor_execute", hook)
            try:
                cut = await poller.poll_once()
            finally:
                if hook:
                    event.remove(db.engine, "before_cursor_execute", hook)
        assert len(selects) == 1, selects
        return cut

    async def scenario():
        poller = event_stream.Poller(db, poll_s=3600.0)  # its own task only waits: polls run here
        fa0, fa1, fb, fc = (poller.register(a, 0), poller.register(a, first_a), poller.register(b, 0),
                            poller.register(c, 0))
        assert poller._task is not None  # started by the first stream
        progress(db, a, 2)
        assert await polled(poller) is False  # four streams, three jobs: one read
        assert fa0.pending == events_in_db(db, a) and fa1.pending == events_in_db(db, a)[1:]
        assert fb.pending == events_in_db(db, b) and fc.pending == events_in_db(db, c)
        assert fa0.wake.is_set() and not fa0.done
        for f in (fa0, fa1, fb, fc):
            f.pending.clear()

        loop, late = asyncio.get_running_loop(), []

        def mid_read(conn, cursor, statement, *args):  # on the read's thread, before its statement runs
            if statement.lstrip().upper().startswith("SELECT") and not late:
                registered = threading.Event()
                loop.call_soon_threadsafe(lambda: (late.append(poller.register(b, 0)), registered.set()))
                assert registered.wait(10)
                progress(db, b, 1)  # committed now: this read may or may not see it, the next one must

        await polled(poller, mid_read)
        assert late[0].pending == []  # registered during the read: not in it
        move(db, c, JobStatus.SUCCEEDED)
        with db.begin() as s:
            s.delete(s.get(Job, a))  # a deleted job ends its streams
        got_b, fb.pending = fb.pending, []  # what the stream would take
        assert await polled(poller) is False
        got_b += fb.pending
        assert late[0].pending == events_in_db(db, b)  # everything from its cursor, once
        assert got_b == events_in_db(db, b)[-1:]  # the event written mid-read, exactly once
        assert fc.done and fc.pending[-1]["data"]["to"] == "succeeded" and not fb.done
        assert fa0.done and fa1.done and fa0.pending == fa1.pending == []
        task = poller._task
        for f in (fa0, fa1, fb, fc, late[0]):
            poller.unregister(f)
        assert poller._task is None  # the last stream gone: the task is cancelled
        await asyncio.sleep(0)
        assert task.cancelled()

    asyncio.run(scenario())


def test_many_live_streams_share_one_read_per_poll(settings, db, auth):
    app = create_app(settings)
    poller = app.state.event_poller
    jobs = [new_job(db) for _ in range(3)]
    first = {j: events_in_db(db, j)[0]["id"] for j in jobs}
    starts = [(j, resume) for j in jobs for resume in (False, True)]  # two streams a job, one resuming
    with live_server(app) as url, httpx.Client(base_url=url, headers=auth, timeout=30) as c:
        def stream(start):
            job_id, resume = start
            headers = {**SSE, "Last-Event-ID": first[job_id]} if resume else SSE
            with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
                return events_of(r)

        with ThreadPoolExecutor(len(starts)) as pool:
            futures = [pool.submit(stream, s) for s in starts]
            deadline = time.monotonic() + 20
            while len(poller.followers) < len(starts):
                assert time.monotonic() < deadline, "the streams did not register"
                time.sleep(0.01)
            with count_selects(app.state.db.engine, tag=lambda: poller.rounds) as rounds:
                for job_id in jobs:
                    move(db, job_id, JobStatus.RUNNING)
                    progress(db, job_id, 3)
                    time.sleep(0.06)
                for job_id in jobs:
                    move(db, job_id, JobStatus.SUCCEEDED)
                got = [f.result(timeout=30) for f in futures]
        for (job_id, resume), messages_ in zip(starts, got, strict=True):
            listed = c.get(f"/v1/jobs/{job_id}/events").json()["data"]
            assert [m.json for m in messages_] == (listed[1:] if resume else listed)  # no loss, no repeat
    assert rounds and set(Counter(rounds).values()) == {1}  # one statement per poll, for all six streams
    assert poller._task is None and not poller.followers
    assert event_stream.open_streams() == 0


def test_read_new_cuts_at_the_limit_oldest_first_and_leaves_out_deleted_jobs(db, tokens):
    done, running = finished_job(db), new_job(db)  # 8 events, 1 event
    events, statuses, cut = event_stream.read_new(db, {done: 0, running: 0, "job_gone": 0}, limit=3)  # 3 + a row a job
    ids = sorted(int(item["id"][4:]) for rows in events.values() for item, _ in rows)
    assert cut and len(ids) == 3 + 3 and ids == [int(e["id"][4:]) for e in events_in_db(db, done)][:len(ids)]
    events, statuses, cut = event_stream.read_new(db, {done: 0, running: 0, "job_gone": 0})
    assert not cut and set(statuses) == {done, running}  # the deleted job: no row
    assert [item for item, _ in events[done]] == events_in_db(db, done)
    assert [final for _, final in events[done]] == [False] * 7 + [True]
    assert [item for item, _ in events[running]] == events_in_db(db, running)
    last = int(events_in_db(db, done)[-1]["id"][4:])
    events, statuses, cut = event_stream.read_new(db, {done: last, running: 0})
    assert done not in events and statuses[done] == "succeeded" and len(events[running]) == 1  # per-job cursors

"""GET /v1/jobs/{id}/events as Server-Sent Events, on events written straight into the
database: the same items as the JSON list, resuming, the end after the final status,
keep-alives, authorization, and a disconnect that leaves no generator and no connection."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from sqlalchemy import select

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

"""Webhooks: registration and its SSRF refusals, the secret shown once, ownership, the outbox
written with the job's change, Standard Webhooks signatures checked by an implementation of
the spec written here, retries with backoff, dispatchers that do not double-send, and a real
tiny job whose events reach a receiver on loopback while a dead receiver changes nothing."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import threading
import time
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from svdforge.api.main import create_app
from svdforge.persistence import urlguard
from svdforge.persistence.keys import create_key
from svdforge.persistence.state import JobStatus, transition
from svdforge.persistence.storage import make_storage
from svdforge.persistence.tables import Job, Webhook, WebhookDelivery, utcnow
from svdforge.persistence.webhooks import claim_due, due_ids, record_attempt, sign
from svdforge.worker.runner import JobRunner
from svdforge.worker.webhooks import Dispatcher, deliver

from .conftest import TINY_REQUEST_OPTIONS, fresh_database, make_settings
from .test_api_jobs import assert_problem

SCHEDULE = [0.05, 0.1]  # seconds after the 1st and 2nd failed attempts: 3 attempts in all
JOB = {"model": "smollm2-135m", "ratio": 0.4}


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, webhooks_allow_private=True, webhooks_retry_schedule_s=SCHEDULE,
                         webhooks_timeout_s=2.0)


class Receiver:
    """A webhook receiver on loopback that records every request and answers `codes` in turn, then 200."""

    def __init__(self, codes=()):
        self.requests: list[dict] = []
        self.codes = list(codes)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                       "path": self.path})
                self.send_response(outer.codes.pop(0) if outer.codes else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(codes=()):
        made.append(Receiver(codes))
        return made[-1]

    yield make
    for r in made:
        r.close()


def dead_url() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's side of the Standard Webhooks spec, written from the spec."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, g) for g in given)


def register(client, auth, url, events=None, **extra):
    body = {"url": url, **({"events": events} if events is not None else {}), **extra}
    r = client.post("/v1/webhooks", json=body, headers=auth)
    assert r.status_code == 201, r.text
    return r.json()


def deliveries(client, auth, webhook_id) -> list[dict]:
    r = client.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=auth)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def dispatch_until(dispatcher: Dispatcher, done, timeout_s: float = 30.0) -> None:
    """Poll the dispatcher (as its thread would) until `done()`; a bound, not a timed assertion."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "deliveries did not settle"
        dispatcher.run_once()
        time.sleep(0.02)


# --- registration -------------------------------------------------------------------------
def test_registration_validates_and_defaults(client, auth):
    hook = register(client, auth, "http://127.0.0.1:9/x", events=["job.failed", "job.failed", "job.running"])
    assert hook["events"] == ["job.failed", "job.running"]  # duplicates dropped, order kept
    assert hook["object"] == "webhook" and hook["id"].startswith("whk_")
    assert register(client, auth, "http://127.0.0.1:9/y")["events"] == ["job.succeeded", "job.failed", "job.cancelled"]
    for body, field in [({}, "url"), ({"url": "http://127.0.0.1/", "events": ["job.exploded"]}, "events[0]"),
                        ({"url": "http://127.0.0.1/", "events": []}, "events"),
                        ({"url": "http://127.0.0.1/", "colour": "red"}, "colour"),
                        ({"url": "ftp://127.0.0.1/"}, "url"), ({"url": "file:///etc/passwd"}, "url"),
                        ({"url": "http://user:pw@127.0.0.1/"}, "url"), ({"url": "http:///nohost"}, "url"),
                        ({"url": "http://127.0.0.1:99999/"}, "url"), ({"url": "not a url"}, "url")]:
        r = client.post("/v1/webhooks", json=body, headers=auth)
        problem = assert_problem(r, 422, "validation_error")
        assert problem["errors"][0]["field"] == field, (body, problem)


def test_bodies_and_cursors_are_checked_as_on_the_other_routes(client, auth):
    """The webhook routes share the jobs routes' strict JSON and cursors: 415, invalid JSON, a bad `after`."""
    r = client.post("/v1/webhooks", content=b"url=http://127.0.0.1/", headers={**auth, "Content-Type": "text/plain"})
    assert "application/json" in assert_problem(r, 415, None)["detail"]
    r = client.post("/v1/webhooks", content=b'{"url": "http://127.0.0.1/", "url": "http://127.0.0.1/x"}',
                    headers={**auth, "Content-Type": "application/json"})
    assert "url" in assert_problem(r, 422, None)["detail"]
    hook = register(client, auth, "http://127.0.0.1:9/x")
    for url in ("/v1/webhooks", f"/v1/webhooks/{hook['id']}/deliveries"):
        assert_problem(client.get(url, params={"after": "garbage"}, headers=auth), 422, "validation_error", "after")
    assert client.get("/v1/webhooks", params={"after": "whk_zzzzzzzzzzzzzzzzzzzzzz"}, headers=auth).json()["data"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/hook", "http://[::1]/hook", "https://127.1/hook",
    "http://2130706433/hook", "http://10.1.2.3/hook", "http://172.16.0.1/hook", "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://224.0.0.251/", "http://0.0.0.0/", "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::a9fe:a9fe]/", "http://100.64.0.1/", "http://240.0.0.1/", "http://255.255.255.255/",
    "http://metadata.google.internal/computeMetadata/v1/", "ftp://93.184.215.14/", "gopher://93.184.215.14/"])
def test_private_and_metadata_urls_are_refused(settings, db, tokens, url):
    strict = settings.model_copy(update={"webhooks_allow_private": False})
    with TestClient(create_app(strict)) as c:
        r = c.post("/v1/webhooks", json={"url": url}, headers={"Authorization": f"Bearer {tokens['alice']}"})
    problem = assert_problem(r, 422, "validation_error")
    assert problem["errors"][0]["field"] == "url" and problem["errors"][0]["type"] == "unsafe_url", problem


def test_public_addresses_pass_and_metadata_stays_refused_when_private_is_allowed(settings, db, tokens, client, auth):
    strict = settings.model_copy(update={"webhooks_allow_private": False})
    with TestClient(create_app(strict)) as c:
        for url in ("https://93.184.215.14/hook", "http://[2606:4700:4700::1111]:8443/hook"):
            r = c.post("/v1/webhooks", json={"url": url}, headers=auth)
            assert r.status_code == 201, r.text
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://metadata.google.internal/"):
        assert_problem(client.post("/v1/webhooks", json={"url": url}, headers=auth), 422, "validation_error")


def test_secret_is_shown_once(client, auth):
    r = client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/"}, headers=auth)
    created = r.json()
    assert r.headers["location"].endswith(f"/v1/webhooks/{created['id']}")
    secret = created["secret"]
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]+={0,2}", secret)
    assert len(base64.b64decode(secret[6:])) >= 24
    got = client.get(f"/v1/webhooks/{created['id']}", headers=auth)
    listed = client.get("/v1/webhooks", headers=auth)
    for resp in (got, listed):
        assert resp.status_code == 200 and secret not in resp.text and "secret" not in resp.text
    assert {k: v for k, v in created.items() if k != "secret"} == got.json()
    assert [h["id"] for h in listed.json()["data"]] == [created["id"]]


def test_another_key_cannot_see_or_delete(client, auth, other_auth):
    hook = register(client, auth, "http://127.0.0.1:9/")
    for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/deliveries")]:
        r = client.request(method, f"/v1/webhooks/{hook['id']}{path}", headers=other_auth)
        assert_problem(r, 404, "not_found")
    assert client.get("/v1/webhooks", headers=other_auth).json()["data"] == []
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=auth).status_code == 200
    r = client.delete(f"/v1/webhooks/{hook['id']}", headers=auth)
    assert r.json() == {"object": "webhook.deleted", "id": hook["id"], "deleted": True}
    assert_problem(client.get(f"/v1/webhooks/{hook['id']}", headers=auth), 404, "not_found")


def test_the_number_of_webhooks_per_key_is_bounded(settings, db, tokens):
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    with TestClient(create_app(settings.model_copy(update={"webhooks_max_per_key": 2}))) as c:
        for i in range(2):
            register(c, auth, f"http://127.0.0.1:9/{i}")
        assert_problem(c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/3"}, headers=auth), 409,
                       "too_many_webhooks")


# --- the outbox -----------------------------------------------------------------------------
def test_deliveries_are_written_with_the_change_for_the_owner_and_events(client, auth, other_auth, db):
    mine = register(client, auth, "http://127.0.0.1:9/", events=["job.cancelled"])
    running_only = register(client, auth, "http://127.0.0.1:9/", events=["job.running"])
    bobs = register(client, other_auth, "http://127.0.0.1:9/", events=["job.cancelled"])
    job_id = client.post("/v1/jobs", json=JOB, headers=auth).json()["id"]
    with db.session(write=True) as s:  # a change rolled back leaves no delivery
        transition(s, s.get(Job, job_id), JobStatus.CANCELLED)
        s.rollback()
    assert deliveries(client, auth, mine["id"]) == []
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)  # queued -> cancelled, in the API's transaction
    assert r.json()["status"] == "cancelled"
    (d,) = deliveries(client, auth, mine["id"])
    assert (d["type"], d["job_id"], d["status"], d["attempts"]) == ("job.cancelled", job_id, "pending", 0)
    assert deliveries(client, auth, running_only["id"]) == [] and deliveries(client, other_auth, bobs["id"]) == []
    with db.session() as s:
        payload = s.get(WebhookDelivery, d["id"]).payload
    assert payload["type"] == "job.cancelled" and payload["data"] == client.get(f"/v1/jobs/{job_id}",
                                                                                 headers=auth).json()


def test_signature_matches_the_spec_vector():
    # the example of the Standard Webhooks specification
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_failing_receiver_is_retried_with_backoff(client, auth, db, settings, receivers):
    rx = receivers(codes=[500, 503])
    hook = register(client, auth, rx.url, events=["job.cancelled"])
    job_id = client.post("/v1/jobs", json=JOB, headers=auth).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    dispatcher = Dispatcher(db, settings)
    assert list(dispatcher.run_once().values()) == ["pending"]
    (d,) = deliveries(client, auth, hook["id"])
    assert (d["attempts"], d["last_status_code"], d["last_error"], d["status"]) == (1, 500, "HTTP 500", "pending")
    assert _ts(d["next_attempt_at"]) - _ts(d["last_attempt_at"]) == pytest.approx(SCHEDULE[0], abs=1e-3)
    dispatch_until(dispatcher, lambda: deliveries(client, auth, hook["id"])[0]["status"] != "pending")
    (d,) = deliveries(client, auth, hook["id"])
    assert (d["status"], d["attempts"], d["last_status_code"], d["next_attempt_at"]) == ("succeeded", 3, 200, None)
    assert [a["status_code"] for a in d["history"]] == [500, 503, 200]
    assert [a["error"] for a in d["history"]] == ["HTTP 500", "HTTP 503", None]
    gaps = [_ts(b["at"]) - _ts(a["at"]) for a, b in zip(d["history"], d["history"][1:], strict=False)]
    assert all(g >= s for g, s in zip(gaps, SCHEDULE, strict=True)), gaps  # never earlier than the schedule
    assert {r["headers"]["webhook-id"] for r in rx.requests} == {d["id"]}  # one message id, every retry
    assert len({r["body"] for r in rx.requests}) == 1
    with db.session() as s:  # the API never shows it again: read it where the dispatcher does
        secret = s.get(Webhook, hook["id"]).secret
    assert all(verify(secret, r["headers"], r["body"]) for r in rx.requests)
    assert not verify(secret, {**rx.requests[0]["headers"], "webhook-timestamp": "1"}, rx.requests[0]["body"])


def test_the_readmes_verification_snippet_accepts_a_delivery(client, auth, db, settings, receivers):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme[readme.index("### Webhooks"):], re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)  # the README's own code
    rx = receivers()
    created = register(client, auth, rx.url, events=["job.cancelled"])
    job_id = client.post("/v1/jobs", json=JOB, headers=auth).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    Dispatcher(db, settings).run_once()
    (req,) = rx.requests
    event = namespace["verify"](created["secret"], req["headers"], req["body"])
    assert (event["type"], event["data"]["id"], event["data"]["status"]) == ("job.cancelled", job_id, "cancelled")
    with pytest.raises(ValueError, match="bad signature"):
        namespace["verify"](created["secret"], req["headers"], req["body"] + b" ")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_a_dead_receiver_is_given_up_after_the_schedule(client, auth, db, settings):
    hook = register(client, auth, dead_url(), events=["job.cancelled"])
    job_id = client.post("/v1/jobs", json=JOB, headers=auth).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    dispatch_until(Dispatcher(db, settings), lambda: deliveries(client, auth, hook["id"])[0]["status"] != "pending")
    (d,) = deliveries(client, auth, hook["id"])
    assert (d["status"], d["attempts"], d["last_status_code"], d["next_attempt_at"]) == ("failed", 3, None, None)
    assert "could not connect" in d["last_error"]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "cancelled"
    assert [x["id"] for x in deliveries(client, auth, hook["id"]) if x["status"] == "failed"] == [d["id"]]
    r = client.get(f"/v1/webhooks/{hook['id']}/deliveries", params={"status": "pending"}, headers=auth)
    assert r.json()["data"] == []


def test_two_dispatchers_never_send_one_attempt_twice(client, auth, db, settings, receivers):
    rx = receivers()
    register(client, auth, rx.url, events=["job.cancelled"])
    ids = [client.post("/v1/jobs", json=JOB, headers=auth).json()["id"] for _ in range(6)]
    for job_id in ids:
        client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    with db.session() as s:  # both read the same due rows; only one claim per row wins
        seen = due_ids(s, utcnow(), 100)
    with db.begin() as s:
        first = claim_due(s, seen, utcnow(), 60)
    with db.begin() as s:
        assert claim_due(s, seen, utcnow(), 60) == []
    with db.begin() as s:  # give them back, as an expired lease would
        s.execute(WebhookDelivery.__table__.update().values(lease_expires_at=None))
    a, b = Dispatcher(db, settings), Dispatcher(db, settings)
    barrier = threading.Barrier(2)

    def run(d):
        barrier.wait()
        d.run_once()

    threads = [threading.Thread(target=run, args=(d,)) for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dispatch_until(a, lambda: len(rx.requests) >= len(first))
    sent = [r["headers"]["webhook-id"] for r in rx.requests]
    assert sorted(sent) == sorted(c.id for c in first) and len(set(sent)) == len(ids)


def test_a_lost_claim_is_due_again_and_its_late_result_is_dropped(client, auth, db, settings, receivers):
    rx = receivers()
    register(client, auth, rx.url, events=["job.cancelled"])
    job_id = client.post("/v1/jobs", json=JOB, headers=auth).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    now = utcnow()
    with db.session() as s:
        seen = due_ids(s, now, 10)
    with db.begin() as s:
        (stale,) = claim_due(s, seen, now, 1)  # a dispatcher that then died mid-send
    later = now + timedelta(seconds=2)
    with db.session() as s:
        assert [i for i, _ in due_ids(s, later, 10)] == [stale.id]  # its lease ran out: due again
        again = due_ids(s, later, 10)
    with db.begin() as s:
        (fresh,) = claim_due(s, again, later, 60)
    attempt = deliver(Dispatcher(db, settings).client, fresh, allow_private=True)
    with db.begin() as s:
        assert record_attempt(s, stale, attempt, SCHEDULE) is None  # the stale claim cannot write
    with db.begin() as s:
        assert record_attempt(s, fresh, attempt, SCHEDULE) == "succeeded"


def test_the_url_is_checked_again_at_delivery_and_connections_go_to_the_checked_address(
        client, auth, db, settings, tokens, receivers, monkeypatch):
    rx = receivers()
    answers = {"hooks.example": "93.184.215.14"}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):  # a resolver we control: no external DNS in tests
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(urlguard.socket, "getaddrinfo", fake)
    strict = settings.model_copy(update={"webhooks_allow_private": False})
    with TestClient(create_app(strict)) as c:  # public at registration
        hook = register(c, auth, f"http://hooks.example:{rx.port}/in", events=["job.cancelled"])
    job_id = client.post("/v1/jobs", json=JOB, headers=auth).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth)
    answers["hooks.example"] = "127.0.0.1"  # ... then the name points inside
    Dispatcher(db, strict).run_once()
    (d,) = deliveries(client, auth, hook["id"])
    assert d["last_error"].startswith("url refused: host hooks.example (127.0.0.1) is a loopback address")
    assert rx.requests == [] and d["status"] == "pending"
    with db.begin() as s:  # due now: an operator who allows private addresses gets it delivered there
        s.execute(WebhookDelivery.__table__.update().values(next_attempt_at=utcnow()))
    Dispatcher(db, settings).run_once()
    (req,) = rx.requests
    assert req["headers"]["host"] == f"hooks.example:{rx.port}" and req["path"] == "/in"


# --- a real job ---------------------------------------------------------------------------
def test_a_real_jobs_events_reach_the_receiver_and_a_dead_one_changes_nothing(tmp_path, tiny_model_root, receivers):
    settings = make_settings(tmp_path, model_root=tiny_model_root, webhooks_allow_private=True,
                             webhooks_retry_schedule_s=[0.05] * 50, webhooks_poll_s=0.05, webhooks_timeout_s=2.0)
    db = fresh_database(settings)
    with db.begin() as s:
        _, token = create_key(s, "alice")
    auth = {"Authorization": f"Bearer {token}"}
    rx = receivers()
    dispatcher = Dispatcher(db, settings).start()  # sends while the job runs, as in a worker
    try:
        with TestClient(create_app(settings)) as client:
            live = register(client, auth, rx.url, events=["job.running", "job.succeeded"])
            dead = register(client, auth, dead_url(), events=["job.succeeded"])
            body = {"model": str(tiny_model_root / "tiny"), "ratio": 0.4, **TINY_REQUEST_OPTIONS,
                    "evaluation": {"enabled": False}}  # the job only has to succeed
            job_id = client.post("/v1/jobs", json=body, headers=auth).json()["id"]
            assert JobRunner(db, make_storage(settings), settings).run(job_id) == "succeeded"
            job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
            deadline = time.monotonic() + 60
            while len(rx.requests) < 2 or deliveries(client, auth, dead["id"])[0]["attempts"] < 2:
                assert time.monotonic() < deadline, (rx.requests, deliveries(client, auth, dead["id"]))
                time.sleep(0.05)
            with db.session() as s:
                secret = s.get(Webhook, live["id"]).secret
            bodies = [json.loads(r["body"]) for r in rx.requests]
            assert [b["type"] for b in bodies] == ["job.running", "job.succeeded"]
            assert all(verify(secret, r["headers"], r["body"]) for r in rx.requests)
            assert bodies[1]["data"] == job and bodies[0]["data"]["status"] == "running"
            assert rx.requests[1]["headers"]["content-type"] == "application/json"
            assert abs(int(rx.requests[1]["headers"]["webhook-timestamp"]) - time.time()) < 600
            listed = {d["type"]: d for d in deliveries(client, auth, live["id"])}
            assert listed["job.succeeded"]["id"] == rx.requests[1]["headers"]["webhook-id"]
            done = listed["job.succeeded"]
            assert (done["status"], done["last_status_code"]) == ("succeeded", 200)
            (d,) = deliveries(client, auth, dead["id"])
            assert d["status"] == "pending" and "could not connect" in d["last_error"]
            assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status"] == "succeeded"
    finally:
        dispatcher.stop()
        db.dispose()

"""The /ui dashboard in a real browser (Debian's chromium, driven by Playwright) against
`svdforge serve` (uvicorn + a Celery worker process, tiny random models): sign in, submit a
job through the form, follow it live to `succeeded`, read its metrics, open a figure,
download an artifact and check its sha256, cancel a running job, and see that another
key sees none of it. The job page's screenshot is kept as test-artifacts/ui-job.png.

Chromium missing: the test fails where CI or SVDFORGE_REQUIRE_BROWSER is set, and is
skipped elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import TEST_DATABASE_URL, fresh_database, make_settings

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SVDFORGE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = ROOT / "test-artifacts" / "ui-job.png"
STORE = "svdforge.apiKey"
LONG_JOB = {"calibration": {"source": "builtin", "samples": 64, "seq_len": 128},
            "adapter": {"type": "lora", "rank": 4, "max_steps": 100000,
                        "data": {"source": "builtin", "samples": 64, "seq_len": 128}},
            "evaluation": {"source": "builtin", "seq_len": 64, "max_tokens": 8192, "throughput": False}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_or_skip() -> None:
    why = None
    if shutil.which(CHROMIUM) is None:
        why = f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "playwright is not installed (pip install -e '.[test]')"
    if why is None:
        return
    if os.environ.get("CI") or os.environ.get("SVDFORGE_REQUIRE_BROWSER"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root):
    _browser_or_skip()
    root = tmp_path_factory.mktemp("ui")
    data = root / "data"
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SVDFORGE_MODEL_ROOT": str(tiny_model_root),
           "SVDFORGE_PROGRESS_INTERVAL_S": "0.2", "SVDFORGE_WORKER_THREADS": "1"}
    for name in ("SVDFORGE_DATABASE_URL", "SVDFORGE_BROKER_URL", "SVDFORGE_STORAGE", "SVDFORGE_STORAGE_DIR"):
        env.pop(name, None)
    if TEST_DATABASE_URL:
        fresh_database(make_settings(root)).dispose()
        env["SVDFORGE_DATABASE_URL"] = TEST_DATABASE_URL
    log = open(root / "serve.log", "w")  # noqa: SIM115 - the service child writes to it until it stops
    proc = subprocess.Popen([sys.executable, "-m", "svdforge.cli.service_cmds", "serve", "--port", str(port),
                             "--data-dir", str(data)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, root / "serve.log")
        yield {"base": base, "alice": (data / "api_key").read_text().strip(), "bob": _bob_key(root),
               "model": str(tiny_model_root / "tiny"), "log": root / "serve.log"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.3)
    pytest.fail("serve did not become ready:\n" + log.read_text())


def _bob_key(root: Path) -> str:
    from svdforge.persistence.db import Database
    from svdforge.persistence.keys import create_key

    db = Database(make_settings(root))  # the same data folder (or PostgreSQL database) as the server's
    try:
        with db.begin() as s:
            return create_key(s, "bob")[1]
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab that records every request and every console message."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.requests, pg.console, pg.errors = [], [], []
    pg.on("request", lambda r: pg.requests.append((r.url, r.headers.get("authorization"))))
    pg.on("console", lambda m: pg.console.append(m.text))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def sign_in(page, base: str, key: str) -> None:
    page.goto(f"{base}/ui")
    page.fill("#signin-key", key)
    page.click("#signin-submit")
    page.wait_for_selector("#main:not([hidden])")


def api(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server["base"], headers={"Authorization": f"Bearer {key}"}, timeout=30)


def wait_status(page, status: str, timeout_s: float) -> None:
    page.wait_for_selector(f"#job-status[data-status={status}]", timeout=timeout_s * 1000)


def check_no_key_leaked(page, *keys: str) -> None:
    """No key in any URL the page asked for; every API request carried it in the header."""
    for url, authorization in page.requests:
        assert not [k for k in keys if k in url], url
        if "/v1/" in url:
            assert authorization and authorization.startswith("Bearer svdf_"), url
    assert page.errors == [], page.errors
    assert not [m for m in page.console if "Content Security Policy" in m], page.console


def submit_form(page, base: str, fields: dict[str, str], checks: dict[str, bool]) -> None:
    page.goto(f"{base}/ui/new")
    page.wait_for_selector("#job-form")
    for selector, value in fields.items():
        if page.locator(selector).evaluate("e => e.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            page.fill(selector, value)
    for selector, on in checks.items():
        page.set_checked(selector, on)
    page.click("#submit")


def check_report(page, client: httpx.Client, job_id: str) -> None:
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    page.wait_for_selector("#report-section:not([hidden])")
    dense, compressed = page.locator('#metrics-table tr[data-metric="perplexity"] td').all_text_contents()
    assert float(dense) == pytest.approx(report["metrics"]["dense"]["ppl"], rel=1e-3)
    assert float(compressed) == pytest.approx(report["metrics"]["compressed"]["ppl"], rel=1e-3)
    items = report["samples"]["items"]
    page.wait_for_selector("#samples-section:not([hidden])")
    assert page.locator("#samples .sample").count() == len(items) > 0
    assert page.locator("#samples .sample pre").first.text_content() == items[0]["dense"]
    # figures: fetched with the key, shown from blob: URLs; one opens large
    page.wait_for_function(f"document.querySelectorAll('#figures img').length === {len(report['figures'])}")
    page.wait_for_function("[...document.querySelectorAll('#figures img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.click('#figures button[data-figure="metrics"]')
    page.wait_for_function("document.getElementById('figure-dialog').open")
    page.wait_for_function("document.getElementById('figure-dialog-img').naturalWidth > 0")
    assert page.locator("#figure-dialog-img").get_attribute("src").startswith("blob:")
    page.click("#figure-close")


def check_download(page, client: httpx.Client, job_id: str, name: str, tmp_path: Path) -> None:
    listed = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert page.locator("#artifacts-body tr").count() == len(listed)
    row = page.locator(f'#artifacts-body tr[data-artifact="{name}"]')
    sha = row.locator(".sha256").text_content()
    assert sha == listed[name]["sha256"]
    with page.expect_download() as dl:
        row.locator("button.download").click()
    saved = tmp_path / name
    dl.value.save_as(saved)
    assert dl.value.suggested_filename == name
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == sha
    assert saved.stat().st_size == listed[name]["bytes"]
    page.wait_for_selector(f'#artifacts-body tr[data-artifact="{name}"] .note[data-verified=yes]')


EVENTS = re.compile(r".*/v1/jobs/[^/]+/events.*")


def serve_events_as_sse(page) -> list[str]:
    """Answer the page's `Accept: text/event-stream` events requests as an event stream (the
    API's JSON page re-sent as SSE, messages marked `[sse]`); the stream then ends."""
    streams: list[str] = []

    def handle(route, request):
        if "text/event-stream" not in (request.headers.get("accept") or ""):
            route.continue_()
            return
        streams.append(request.url)
        events = route.fetch(headers={**request.headers, "accept": "application/json"}).json()["data"]
        marked = [{**e, "message": f"[sse] {e['message']}"} for e in events]
        body = ": comment\r\n\r\n" + "".join(
            f"id: {e['id']}\r\nevent: {e['type']}\r\ndata: {json.dumps(e)}\r\n\r\n" for e in marked)
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    page.route(EVENTS, handle)
    return streams


def test_event_stream_frames_split_anywhere(server, page):
    """The SSE parser gives the same messages wherever the stream is cut into chunks."""
    page.goto(f"{server['base']}/ui")
    results = page.evaluate("""() => {
        const text = ': hello\\r\\nid: evt_1\\r\\nevent: status\\r\\ndata: {"a": 1}\\r\\n\\r\\n'
                   + 'id: evt_2\\ndata: line 1\\ndata: line 2\\n\\nid: evt_3\\revent: log\\rdata:x\\r\\rdata: partial';
        const out = [];
        for (let i = 0; i <= text.length; i += 1) {
            const first = SVD.sseFrames(text.slice(0, i));
            const second = SVD.sseFrames(first.rest + text.slice(i));
            out.push(JSON.stringify([...first.frames, ...second.frames]) + "|" + second.rest);
        }
        return out;
    }""")
    expected = [{"id": "evt_1", "event": "status", "data": '{"a": 1}'},
                {"id": "evt_2", "event": "message", "data": "line 1\nline 2"},
                {"id": "evt_3", "event": "log", "data": "x"}]
    for r in results:
        frames, rest = r.rsplit("|", 1)
        assert json.loads(frames) == expected and rest == "data: partial"


def test_dashboard_in_a_browser(server, page, tmp_path):
    base, alice, bob = server["base"], server["alice"], server["bob"]
    event_types = []  # content types of the events answers: the job page follows the real event stream
    page.on("response", lambda r: EVENTS.fullmatch(r.url) and event_types.append(r.headers.get("content-type", "")))
    page.goto(f"{base}/ui")
    page.fill("#signin-key", "svdf_not-a-key")
    page.click("#signin-submit")
    page.wait_for_selector("#signin-problem:not([hidden])")
    assert "a valid API key is required" in page.locator("#signin-problem").text_content()
    sign_in(page, base, alice)
    assert page.evaluate(f"sessionStorage.getItem('{STORE}')") == alice
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    page.wait_for_selector("#jobs-empty:not([hidden])")

    # a refused request: the API's problem is what the page says
    submit_form(page, base, {"#model": "/no/such/model", "#ratio": "0.4"}, {})
    problem = api(server, alice).post("/v1/jobs", json={"model": "/no/such/model", "ratio": 0.4}).json()
    page.wait_for_selector("#problem:not([hidden])")
    shown = page.locator("#problem").text_content()
    assert problem["title"] in shown and problem["detail"] in shown

    submit_form(page, base, {"#model": server["model"], "#ratio": "0.4", "#method": "svd-llm",
                             "#adapter": "none", "#calibration-samples": "4", "#calibration-seq_len": "32",
                             "#evaluation-seq_len": "32", "#evaluation-max_tokens": "256"},
                {"#evaluation-throughput": False})
    page.wait_for_url(f"{base}/ui/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[1]
    wait_status(page, "succeeded", 180)
    assert any(t.startswith("text/event-stream") for t in event_types), event_types
    client = api(server, alice)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["request"]["calibration"] == {"source": "builtin", "samples": 4, "seq_len": 32, "seed": 0}
    assert job["request"]["evaluation"]["throughput"] is False
    statuses = page.locator("#stages-body tr").evaluate_all("rows => rows.map(r => r.dataset.status)")
    assert set(statuses) <= {"completed", "skipped"} and "completed" in statuses
    page.wait_for_selector('#events li[data-type="stage_started"]')   # the log followed the run
    check_report(page, client, job_id)
    check_download(page, client, job_id, "model.safetensors", tmp_path)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    print(f"dashboard screenshot: {SCREENSHOT}")

    # cancel a running job from its page; its events come first as an event stream, then by polling
    long_id = client.post("/v1/jobs", json={"model": server["model"], "ratio": 0.4, **LONG_JOB}).json()["id"]
    streams = serve_events_as_sse(page)
    page.goto(f"{base}/ui/jobs/{long_id}")
    page.wait_for_selector('#events li:has-text("[sse] job queued")')
    wait_status(page, "running", 120)
    page.wait_for_selector('#events li[data-type="stage_started"]:not(:has-text("[sse]"))')  # polled
    assert len(streams) == 1
    page.unroute(EVENTS)
    page.goto(f"{base}/ui")   # the list shows it running, with its stage's progress
    page.wait_for_selector(f'#jobs-body tr[data-job-id="{long_id}"][data-status=running] progress')
    label = page.locator(f'#jobs-body tr[data-job-id="{long_id}"] .progress').text_content()
    assert re.fullmatch(r"\s*(waiting|load|whiten|svd|recover|evaluate|upload) \d+ %", label), label
    page.goto(f"{base}/ui/jobs/{long_id}")
    wait_status(page, "running", 30)
    page.click("#cancel")
    wait_status(page, "cancelled", 120)
    assert page.locator("#cancel").is_hidden()
    assert client.get(f"/v1/jobs/{long_id}").json()["status"] == "cancelled"

    page.goto(f"{base}/ui")
    page.wait_for_selector(f'#jobs-body tr[data-job-id="{long_id}"][data-status=cancelled]')
    row = page.locator(f'#jobs-body tr[data-job-id="{job_id}"]')
    assert row.get_attribute("data-status") == "succeeded"
    assert [c.strip() for c in row.locator("td").all_text_contents()[2:5]] == [server["model"], "0.4", "svd-llm"]

    # another key sees none of it
    page.click("#signout")
    page.wait_for_selector("#signin-panel:not([hidden])")
    assert page.evaluate(f"sessionStorage.getItem('{STORE}')") is None
    sign_in(page, base, bob)
    page.wait_for_selector("#jobs-empty:not([hidden])")
    page.goto(f"{base}/ui/jobs/{job_id}")
    page.wait_for_selector("#problem:not([hidden])")
    assert f"no job {job_id}" in page.locator("#problem").text_content()
    assert page.locator("#metrics-table td").count() == 0 and page.locator("#artifacts-body tr").count() == 0
    check_no_key_leaked(page, alice, bob)

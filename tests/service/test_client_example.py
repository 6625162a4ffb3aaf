"""examples/compress_with_client.py (only the generated client) against `svdforge serve`:
upload, submit, follow, download with sha256 check, metrics; on the tiny model to stay fast.
examples/follow_job.py: a real job's event stream, a reconnect after a cut, the polling fallback."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from svdforge.api.main import create_app

from .conftest import TINY_REQUEST_OPTIONS
from .sse import live_server
from .test_e2e import server  # noqa: F401 - the module-scoped embedded service fixture

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "compress_with_client.py"


def test_example_runs_against_the_embedded_service(server, tmp_path):  # noqa: F811 - the fixture imported above
    text = tmp_path / "calib.txt"
    lines = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the king speaks of "
             f"honour, love and the sea, and the players answer in verse number {i}." for i in range(400)]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python"),
           "SVDFORGE_API_KEY": (server["data"] / "api_key").read_text().strip()}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", str(server["client"].base_url).rstrip("/"), "--text", str(text),
         "--model", server["model"], "--ratio", "0.4", "--calib-samples", "4", "--calib-seq-len", "32",
         "--eval-max-tokens", "256", "--eval-seq-len", "32", "--out", str(tmp_path / "out"), "--poll", "0.3",
         "--timeout", "240"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server["log"].read_text()[-3000:]
    out = proc.stdout
    assert "uploaded calib.txt" in out
    assert "sha256" in out and "verified" in out
    assert "compressed ppl" in out and "dense PPL" in out
    assert "%" in out  # progress lines
    assert "figure ranks.png: /v1/jobs/" in out and "figure metrics.png" in out  # the report links its figures
    weights = list((tmp_path / "out").rglob("model.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size > 0


FOLLOW = ROOT / "examples" / "follow_job.py"


def load_follow_example():
    spec = importlib.util.spec_from_file_location("follow_job", FOLLOW)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_follow_example_follows_a_real_job(server):  # noqa: F811 - the fixture imported above
    client = server["client"]
    job_id = client.post("/v1/jobs", json={"model": server["model"], "ratio": 0.4, **TINY_REQUEST_OPTIONS}).json()["id"]
    env = {**os.environ, "SVDFORGE_API_KEY": (server["data"] / "api_key").read_text().strip()}
    proc = subprocess.run([sys.executable, str(FOLLOW), job_id, "--url", str(client.base_url).rstrip("/"), "--json",
                           "--timeout", "240"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server["log"].read_text()[-3000:]
    *lines, verdict = proc.stdout.splitlines()
    assert verdict == f"job {job_id} succeeded"
    assert "polling" not in proc.stderr and "reconnecting" not in proc.stderr  # it was the stream, in one go
    listed = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert [json.loads(x) for x in lines] == listed


class _Cut(httpx.SyncByteStream):
    """A response body that breaks (as a dropped connection does) after `n` SSE messages."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n = inner, n

    def __iter__(self):
        buf, sent = b"", 0
        for chunk in self.inner:
            buf += chunk
            while b"\n\n" in buf:
                msg, buf = buf.split(b"\n\n", 1)
                yield msg + b"\n\n"
                sent += msg.startswith(b"id:")
                if sent == self.n:
                    self.inner.close()
                    raise httpx.ReadError("connection cut by the test")

    def close(self) -> None:
        self.inner.close()


class _Proxy(httpx.BaseTransport):
    """Loopback HTTP that can cut the first event stream, or ask for JSON whatever the client asked."""

    def __init__(self, cut_after: int | None = None, json_only: bool = False) -> None:
        self.inner, self.cut_after, self.json_only, self.requests = httpx.HTTPTransport(), cut_after, json_only, []

    def handle_request(self, request):
        if self.json_only:
            request.headers["Accept"] = "application/json"
        self.requests.append(request)
        r = self.inner.handle_request(request)
        if self.cut_after is None or not r.headers.get("content-type", "").startswith("text/event-stream"):
            return r
        n, self.cut_after = self.cut_after, None
        return httpx.Response(r.status_code, headers=r.headers, stream=_Cut(r.stream, n), extensions=r.extensions)


@pytest.fixture
def finished(db, settings, auth):
    from .test_event_stream import finished_job

    job_id = finished_job(db)
    with live_server(create_app(settings)) as url:
        yield url, job_id, httpx.get(f"{url}/v1/jobs/{job_id}/events", headers=auth).json()["data"]


def test_follow_example_reconnects_with_last_event_id(finished, auth):
    url, job_id, listed = finished
    follow_job, proxy, got = load_follow_example(), _Proxy(cut_after=3), []
    with httpx.Client(base_url=url, headers=auth, transport=proxy, timeout=30) as c:
        final = follow_job.follow(c, job_id, got.append, timeout_s=60, retry_s=0.01)
    assert got == listed and final == listed[-1]  # nothing lost, nothing twice
    assert [r.headers.get("last-event-id") for r in proxy.requests] == [None, listed[2]["id"]]


def test_follow_example_polls_when_the_answer_is_no_stream(finished, auth):
    url, job_id, listed = finished
    follow_job, proxy, got = load_follow_example(), _Proxy(json_only=True), []
    with httpx.Client(base_url=url, headers=auth, transport=proxy, timeout=30) as c:
        final = follow_job.follow(c, job_id, got.append, timeout_s=60, poll_s=0.01)
    assert got == listed and final["data"]["to"] == "succeeded"
    assert len(proxy.requests) == 2 and "after" not in proxy.requests[1].url.params  # the JSON answer, then a page

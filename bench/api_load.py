"""Load test of the embedded service: 50 concurrent clients, 200 job submissions and 2000
status polls on loopback; prints a latency table and checks the targets.

Targets: no 5xx; p99 < 100 ms for POST /v1/jobs and < 50 ms for GET /v1/jobs/{id}, while 50
Server-Sent-Events followers (`--followers`) stay attached to submitted jobs: each opens
`GET /v1/jobs/{id}/events` with `Accept: text/event-stream` and reads it until the server
closes it after the job's final status (the cancels at the end). Reported for them: the
first event's latency (request sent -> first message parsed), 5xx, and that every stream
ended with the final status, its ids strictly increasing.

    python bench/api_load.py                   # starts `svdforge serve` on a free port, temp data dir
    python bench/api_load.py --servers         # the production topology: PostgreSQL, Redis, S3 (SeaweedFS),
                                               # uvicorn and a Celery worker as processes (tests/integration)
    python bench/api_load.py --url http://127.0.0.1:8000 --key-file var/api_key

The started server is the real embedded mode (uvicorn + Celery worker on the filesystem
queue), so the worker picks up the first submitted job while the load runs, as it would
in use. At the end every submitted job is cancelled and the started server is stopped.
Each client pauses between its requests (`--think-ms`, default 250 ms: a client following
a job polls a few times a second), so 50 clients offer about 180 requests/s;
`--think-ms 0` is a closed loop at saturation instead (reported, not a target).

How the load is offered (what load generators such as locust or k6 do; the
flags show the difference):
- Warm-up, untimed: one job submission and one poll before the clients start (a new
  server's first POST builds SQLAlchemy's statement cache and the queue's producer: ~50 ms),
  and each client opens its connection with a `GET /healthz`.
- Ramp-up: clients start at random moments within `--ramp-ms` (default 1000 ms, a spawn
  rate of 50 clients/s), and each pause is drawn uniformly from 0.5-1.5 x `--think-ms`, so
  clients do not fire in lockstep. Every client's first request is a POST: `--ramp-ms 0` is
  50 job submissions in the same millisecond (a burst; reported, not a target).
- The clients are aiohttp sessions in one event loop (`--client aiohttp`, default). httpx
  costs about twice the client CPU per request; on 2 cores that CPU is taken from the
  server under test and shows up as server latency (`--client httpx` measures it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
POST, GET = "POST /v1/jobs", "GET /v1/jobs/{id}"
SSE = "SSE /v1/jobs/{id}/events (first event)"
FINAL = {"succeeded", "failed", "cancelled"}
TARGET_P99_MS = {POST: 100.0, GET: 50.0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc), to report the API's cost per request."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, worker_threads: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SVDFORGE_WORKER_THREADS": str(worker_threads)}
    log = open(data_dir.parent / "serve.log", "w")  # noqa: SIM115 - the server child writes to it until it stops
    proc = subprocess.Popen([sys.executable, "-m", "svdforge.cli.service_cmds", "serve", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited:\n" + (data_dir.parent / "serve.log").read_text())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become ready")


class Client:
    """The part of an HTTP client the loop needs, over aiohttp or httpx: (status, JSON body)."""

    def __init__(self, kind: str, base: str, key: str, clients: int) -> None:
        self.kind, self.base, self.headers, self.clients = kind, base, {"Authorization": f"Bearer {key}"}, clients

    async def __aenter__(self) -> Client:
        if self.kind == "aiohttp":
            self.s = aiohttp.ClientSession(self.base, headers=self.headers,
                                           connector=aiohttp.TCPConnector(limit=self.clients),
                                           timeout=aiohttp.ClientTimeout(total=30))
        else:
            limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
            self.s = httpx.AsyncClient(base_url=self.base, headers=self.headers, limits=limits, timeout=30)
        return self

    async def __aexit__(self, *exc) -> None:
        await (self.s.close() if self.kind == "aiohttp" else self.s.aclose())

    async def request(self, method: str, path: str, json=None) -> tuple[int, dict | None]:
        if self.kind == "aiohttp":
            async with self.s.request(method, path, json=json) as r:
                if r.status >= 300:
                    await r.read()  # drained, the connection goes back to the pool
                    return r.status, None
                return r.status, await r.json(content_type=None)
        r = await self.s.request(method, path, json=json)
        return r.status_code, (r.json() if r.status_code < 300 else None)


CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, httpx.HTTPError)


async def client_loop(client: Client, n_submit: int, n_poll: int, model: str, think_s: float, ramp_s: float,
                      samples: dict[str, list[float]], statuses: dict[str, list[int]], job_ids: list[str]) -> None:
    """One client: submissions spread among its polls; polls go to its own jobs."""
    plan = [POST] * n_submit + [GET] * n_poll
    random.shuffle(plan)
    first_post = plan.index(POST)
    plan.insert(0, plan.pop(first_post))  # a poll needs a job to poll
    mine: list[str] = []
    await client.request("GET", "/healthz")  # open the connection, untimed
    if ramp_s:
        await asyncio.sleep(random.uniform(0, ramp_s))
    for op in plan:
        t0 = time.perf_counter()
        try:
            if op == POST:
                code, body = await client.request("POST", "/v1/jobs", json={"model": model, "ratio": 0.4})
                if code == 201:
                    mine.append(body["id"])
                    job_ids.append(body["id"])
            elif mine:
                code, _ = await client.request("GET", f"/v1/jobs/{random.choice(mine)}")
            else:
                continue  # every submission of this client failed: nothing to poll
        except CLIENT_ERRORS:
            code = 599  # no answer (timeout, reset): counted as a server error
        samples[op].append((time.perf_counter() - t0) * 1000)
        statuses[op].append(code)
        if think_s:
            await asyncio.sleep(random.uniform(0.5 * think_s, 1.5 * think_s))


class Follow:
    """What one SSE follower saw."""

    def __init__(self) -> None:
        self.code, self.first_ms, self.ids, self.final = 0, None, [], None


async def follower(base: str, key: str, ramp_s: float, job_ids: list[str], done: asyncio.Event,
                   out: list[Follow]) -> None:
    """Attach to a submitted job's event stream during the load and read it to its end."""
    await asyncio.sleep(random.uniform(0, ramp_s) if ramp_s else 0)
    while not job_ids and not done.is_set():
        await asyncio.sleep(0.05)
    if not job_ids:
        return
    seen, job_id = Follow(), random.choice(job_ids)
    out.append(seen)
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    t0 = time.perf_counter()
    try:
        async with aiohttp.ClientSession(base, timeout=timeout) as s, \
                s.get(f"/v1/jobs/{job_id}/events", headers=headers) as r:
            seen.code = r.status
            if r.status != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
                await r.read()
                return
            async for raw in r.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("id: "):
                    seen.ids.append(int(line[len("id: evt_"):]))
                elif line.startswith("data: "):
                    if seen.first_ms is None:
                        seen.first_ms = (time.perf_counter() - t0) * 1000
                    event = json.loads(line[len("data: "):])
                    if event["type"] == "status" and event["data"]["to"] in FINAL:
                        seen.final = event["data"]["to"]
    except CLIENT_ERRORS:
        seen.code = seen.code or 599


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


async def run(base: str, key: str, clients: int, submissions: int, polls: int, model: str, think_ms: float,
              ramp_ms: float, kind: str, followers: int):
    samples: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, list[int]] = defaultdict(list)
    job_ids: list[str] = []
    follows: list[Follow] = []
    async with Client(kind, base, key, clients) as client:
        code, body = await client.request("POST", "/v1/jobs", json={"model": model, "ratio": 0.4})  # warm-up
        if code != 201:
            raise SystemExit(f"warm-up submission failed: HTTP {code}")
        warm_up = body["id"]
        await client.request("GET", f"/v1/jobs/{warm_up}")
        done = asyncio.Event()
        # the followers attach to the jobs this run submits, within the clients' ramp-up and a second after
        attached = [asyncio.ensure_future(follower(base, key, ramp_ms / 1000 + 1, job_ids, done, follows))
                    for _ in range(followers)]
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client, submissions // clients, polls // clients, model, think_ms / 1000,
                                           ramp_ms / 1000, samples, statuses, job_ids) for _ in range(clients)))
        wall = time.perf_counter() - t0
        done.set()
        for job_id in [warm_up, *job_ids]:  # leave nothing running; the streams end with these
            await client.request("POST", f"/v1/jobs/{job_id}/cancel")
        _, pending = await asyncio.wait(attached, timeout=180) if attached else (None, [])
        for task in pending:  # a stream that never ended: counted below as not ended
            task.cancel()
    for f in follows:
        if f.first_ms is not None:
            samples[SSE].append(f.first_ms)
        statuses[SSE].append(f.code)
    return samples, statuses, wall, follows


def table(samples, statuses, wall: float, follows: list[Follow]) -> tuple[str, bool]:
    lines = ["| request | n | 2xx | 4xx | 5xx/none | p50 ms | p95 ms | p99 ms | max ms | target p99 | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok_all = True
    for op in (POST, GET, SSE):
        v, codes = samples[op], statuses[op]
        if op == SSE and not codes:
            continue
        n5 = sum(c >= 500 for c in codes)
        p99 = pct(v, 99) if v else float("nan")
        target = TARGET_P99_MS.get(op)
        ok = n5 == 0 and all(c < 300 for c in codes) and len(v) == len(codes) and (target is None or p99 < target)
        ok_all &= ok
        stats = f"{pct(v, 50):.1f} | {pct(v, 95):.1f} | {p99:.1f} | {max(v):.1f}" if v else "- | - | - | -"
        lines.append(f"| {op} | {len(codes)} | {sum(200 <= c < 300 for c in codes)} | "
                     f"{sum(400 <= c < 500 for c in codes)} | {n5} | {stats} | "
                     f"{f'< {target:.0f}' if target else '(reported)'} | {'yes' if ok else 'NO'} |")
    total = sum(len(statuses[op]) for op in (POST, GET))
    lines.append(f"\n{total} requests in {wall:.1f} s ({total / wall:.0f} req/s)")
    if follows:
        ended = sum(f.final is not None for f in follows)
        ordered = all(f.ids == sorted(set(f.ids)) for f in follows)
        events = sum(len(f.ids) for f in follows)
        lines.append(f"{len(follows)} SSE followers: {ended} streams ended after the final status, {events} events, "
                     f"ids strictly increasing in each: {'yes' if ordered else 'NO'}")
        ok_all &= ended == len(follows) and ordered
    return "\n".join(lines), ok_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--key-file", type=Path, help="API key file for --url (default: ./var/api_key)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--submissions", type=int, default=200)
    ap.add_argument("--polls", type=int, default=2000)
    ap.add_argument("--followers", type=int, default=50, help="SSE followers attached during the load (0: none)")
    ap.add_argument("--think-ms", type=float, default=250.0, help="pause between a client's requests")
    ap.add_argument("--ramp-ms", type=float, default=1000.0,
                    help="clients start at random moments within this window (0: all at once)")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp", help="the load generator's HTTP client")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--worker-threads", type=int, default=1, help="torch threads of the started worker")
    ap.add_argument("--servers", action="store_true",
                    help="start PostgreSQL, Redis and SeaweedFS and run the API and a worker against them")
    args = ap.parse_args()

    proc, tmp, servers, stack = None, None, None, None
    mode = "embedded mode"
    if args.url:
        base, key = args.url.rstrip("/"), (args.key_file or Path("var/api_key")).read_text().strip()
        mode = base
    elif args.servers:
        sys.path.insert(0, str(ROOT))
        from tests.integration.servers import Servers, Stack, missing

        if missing():
            raise SystemExit("missing: " + "; ".join(missing()))
        tmp = Path(tempfile.mkdtemp(prefix="svdforge-bench-"))
        servers = Servers.start(tmp / "servers")
        stack = Stack(servers, tmp / "svc", "api_load", isolated_cache=False, worker_threads=args.worker_threads)
        proc = stack.start_api()
        stack.start_worker("w1", nice=10)  # as `svdforge serve` runs its worker: the two modes compare
        base, key = stack.base_url, stack.token
        mode = "PostgreSQL + Redis + S3, uvicorn and a Celery worker (nice 10) as processes"
    else:
        tmp = Path(tempfile.mkdtemp(prefix="svdforge-bench-"))
        port = free_port()
        proc = start_server(tmp / "data", port, args.worker_threads)
        base, key = f"http://127.0.0.1:{port}", (tmp / "data" / "api_key").read_text().strip()
    cpu_before = cpu_seconds(proc.pid) if proc else None
    load_before = os.getloadavg()[0]
    try:
        samples, statuses, wall, follows = asyncio.run(run(base, key, args.clients, args.submissions, args.polls,
                                                           args.model, args.think_ms, args.ramp_ms, args.client,
                                                           args.followers))
        api_cpu = cpu_seconds(proc.pid) - cpu_before if proc else None
    finally:
        if stack is not None:
            stack.stop()
            servers.stop()
            proc = None
            shutil.rmtree(tmp, ignore_errors=True)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if os.environ.get("SVDFORGE_BENCH_KEEP"):
                print(f"data and server log kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    text, ok = table(samples, statuses, wall, follows)
    print(f"{args.clients} clients ({args.client}), {args.followers} SSE followers, {args.submissions} submissions, "
          f"{args.polls} polls, "
          f"think {args.think_ms:g} ms, ramp-up {args.ramp_ms:g} ms, {mode}\n")
    print(text)
    n = sum(len(statuses[op]) for op in (POST, GET))
    if api_cpu is not None:
        print(f"API process CPU: {api_cpu:.2f} s for {n} requests ({1000 * api_cpu / n:.2f} ms per request, "
              "the cancels at the end included)")
    print(f"machine load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs)")
    print("\ntargets met" if ok else "\ntargets MISSED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

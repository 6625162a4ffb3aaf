"""Recovery time after kill -9 of a worker, with the default lease settings, on the production
topology (PostgreSQL, Redis, SeaweedFS S3; API and workers as separate processes).

    python bench/crash_recovery.py                 # 4 trials, prints a table
    python bench/crash_recovery.py --write         # ... and rewrites docs/crash_recovery.md's table

Each trial submits a tiny-model job whose calibration or evaluation lasts a while, kills the
worker (SIGKILL) while that stage runs, and starts a new worker at once, as a supervisor
(systemd `Restart=always`, a container restart policy) would. It records, from the kill:
when the reaper requeued the job, when attempt 2 was running, and when the job succeeded.
Needs the servers of the integration suite (`.ci/servers`; `pip install -e '.[test]'`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test helpers (tests.integration), not svdforge: that is installed

from tests.integration.servers import Servers, Stack, missing  # noqa: E402 - after the sys.path line above

DOC = ROOT / "docs" / "crash_recovery.md"
# Real request options that keep one stage busy for several seconds on the tiny model.
JOBS = {
    "whiten": {"calibration": {"source": "builtin", "samples": 768, "seq_len": 256},
               "evaluation": {"source": "builtin", "seq_len": 32, "max_tokens": 256, "throughput": False}},
    "evaluate": {"calibration": {"source": "builtin", "samples": 4, "seq_len": 32},
                 "evaluation": {"source": "builtin", "seq_len": 128, "max_tokens": 131072, "throughput": False}},
}


def poll(client, job_id: str, until, timeout: float, interval: float = 0.05) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(interval)
    raise TimeoutError(f"job {job_id}: condition not met in {timeout:.0f} s (last: {job['status']})")


def trial(stack: Stack, model: str, stage: str, n: int) -> dict:
    worker = stack.start_worker(f"w{n}a")
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json={"model": model, "ratio": 0.4, **JOBS[stage]}).json()["id"]
        stages = {"whiten", "svd"} if stage == "whiten" else {"evaluate"}
        poll(client, job_id, lambda j: j["status"] == "running" and j["stage"] in stages, 300)
        worker.kill()
        t0 = time.monotonic()
        stack.start_worker(f"w{n}b", wait=False)  # the supervisor restarts it
        marks: dict[str, float] = {}
        deadline = t0 + 600
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            now = time.monotonic() - t0
            if job["status"] == "queued":
                marks.setdefault("requeued", now)
            if job["attempt"] == 2 and job["status"] == "running":
                marks.setdefault("requeued", now)
                marks.setdefault("running", now)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                marks.setdefault("running", now)
                marks["done"] = now
                break
            time.sleep(0.05)
        report = client.get(f"/v1/jobs/{job_id}/report").json() if job["status"] == "succeeded" else {}
    for proc in list(stack.procs):
        if proc.kind == "worker":
            proc.kill()
            stack.procs.remove(proc)
    return {"stage": stage, "status": job["status"], "attempt": job["attempt"], **marks,
            "resumed": bool(report.get("resumed"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--write", action="store_true", help=f"rewrite the measured table in {DOC.relative_to(ROOT)}")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (server and worker logs)")
    args = ap.parse_args()
    absent = missing()
    if absent:
        raise SystemExit("missing: " + "; ".join(absent))
    from svdforge.core.testing import make_tiny_model
    from svdforge.persistence.settings import Settings

    defaults = Settings(_env_file=None)
    tmp = Path(tempfile.mkdtemp(prefix="svdforge-recovery-"))
    make_tiny_model(tmp / "models" / "tiny")
    rows = []
    try:
        with Servers.start(tmp / "servers") as servers:
            stack = Stack(servers, tmp / "svc", "recovery", model_root=tmp / "models")  # default lease settings
            stack.start_api()
            for n in range(args.trials):
                stage = ("whiten", "evaluate")[n % 2]
                row = trial(stack, str(tmp / "models" / "tiny"), stage, n)
                rows.append(row)
                print(json.dumps(row), flush=True)
            stack.stop()
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    lines = ["| trial | killed during | requeued after | running again after | succeeded after | attempt | resumed |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['stage']} | {r.get('requeued', float('nan')):.1f} s | "
                     f"{r.get('running', float('nan')):.1f} s | {r.get('done', float('nan')):.1f} s | "
                     f"{r['attempt']} | {'yes' if r['resumed'] else 'no'} |")
    running = [r["running"] for r in rows if "running" in r]
    summary = (f"Running again after kill -9: median {statistics.median(running):.1f} s, max {max(running):.1f} s "
               f"(goal < 120 s) with lease_s={defaults.lease_s}, reap interval {defaults.reap_every_s:.0f} s, "
               f"heartbeat every {defaults.progress_interval_s:g} s.")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + summary)
    ok = all(r["status"] == "succeeded" and r["attempt"] == 2 for r in rows) and max(running) < 120
    if args.write:
        text = DOC.read_text()
        start, end = text.index("<!-- measured -->"), text.index("<!-- /measured -->")
        stamp = (f"Measured {datetime.date.today().isoformat()} by `python bench/crash_recovery.py --write` "
                 f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end).")
        DOC.write_text(text[:start] + "<!-- measured -->\n" + table + "\n\n" + summary + "\n" + stamp + "\n"
                       + text[end:])
        print(f"wrote {DOC}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""`make run`: start the embedded service, run a real job on smollm2-135m, follow it,
download the safetensors, check its sha256, print the report and the sample completions
(dense vs compressed), stop the service.

    python -m svdforge.cli.demo                          # data in ./var (or $SVDFORGE_DATA_DIR), port 8000 if free
    python -m svdforge.cli.demo --url http://host:8000   # use a running service (key: --key-file or $SVDFORGE_API_KEY)
    python -m svdforge.cli.demo --keep-running           # leave the service up afterwards
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"succeeded", "failed", "cancelled"}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_port(preferred: int) -> int:
    if _port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(data_dir: Path, port: int) -> subprocess.Popen:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "serve.log"
    print(f"starting the embedded service: svdforge serve --port {port} --data-dir {data_dir} (log: {log})",
          flush=True)
    with open(log, "ab") as out:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-m", "svdforge.cli.service_cmds", "serve", "--port", str(port),
                                 "--data-dir", str(data_dir)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                print(f"service ready at http://127.0.0.1:{port} (API docs at /docs); "
                      f"API key in {data_dir / 'api_key'}", flush=True)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the service did not become ready within 120 s")


def follow(client: httpx.Client, job_id: str) -> dict:
    """Print the job's events as they come (progress at most every few seconds)."""
    after, t0, last_progress = None, time.monotonic(), 0.0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000, **({"after": after} if after else {})})
        page.raise_for_status()
        for e in page.json()["data"]:
            after = e["id"]
            stamp = f"[{time.monotonic() - t0:6.1f}s]"
            if e["type"] == "progress":
                if time.monotonic() - last_progress < 3 and (e["data"] or {}).get("fraction", 0) < 1:
                    continue
                last_progress = time.monotonic()
                pct = 100 * (e["data"] or {}).get("fraction", 0)
                print(f"{stamp} {e['stage'] or '':8} {pct:5.1f}%  {e['message']}", flush=True)
            elif e["type"] == "stage_finished":
                print(f"{stamp} {e['stage']:8} done ({(e['data'] or {}).get('seconds', 0):.1f}s)", flush=True)
            elif e["type"] in ("stage_started", "status", "error", "log"):
                print(f"{stamp} {e['stage'] or '':8} {e['type']}: {e['message']}", flush=True)
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL and not page.json()["has_more"]:
            return job
        time.sleep(1.0)


def download(client: httpx.Client, artifact: dict, dest: Path) -> str:
    """Stream the file to `dest`; return the sha256 of what arrived, checked against both claims."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, done = hashlib.sha256(), 0
    with client.stream("GET", artifact["content_url"]) as r, open(dest, "wb") as f:
        r.raise_for_status()
        header = r.headers["x-content-sha256"]
        for chunk in r.iter_bytes(1 << 20):
            digest.update(chunk)
            f.write(chunk)
            done += len(chunk)
    got = digest.hexdigest()
    if not (got == artifact["sha256"] == header):
        raise SystemExit(f"sha256 mismatch for {artifact['name']}: got {got}, artifact {artifact['sha256']}, "
                         f"header {header}")
    print(f"downloaded {artifact['name']} ({done / 1e6:.1f} MB) to {dest}\nsha256 {got} OK "
          "(matches the artifact record and the response header)", flush=True)
    return got


def print_report(report: dict) -> None:
    m = report.get("metrics") or {}
    dense, comp = m.get("dense") or {}, m.get("compressed") or {}
    params = report.get("params") or {}
    rows = [("dense perplexity", dense.get("ppl")), ("compressed perplexity", comp.get("ppl")),
            ("teacher KL (nats/token)", comp.get("teacher_kl")), ("top-10 recall", comp.get("top10_recall")),
            ("top-1 agreement", comp.get("agreement")), ("parameters dense", params.get("dense")),
            ("parameters compressed", params.get("compressed")), ("parameter reduction", params.get("reduction")),
            ("total time (s)", (report.get("timings_s") or {}).get("total"))]
    print("\nreport")
    for name, value in rows:
        if value is None:
            continue
        text = f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {name:26} {text}")


def print_samples(report: dict) -> None:
    """The report's greedy completions, dense vs compressed, one prompt at a time."""
    samples = report.get("samples") or {}
    if samples.get("skipped") or not samples.get("items"):
        print(f"\nsamples: skipped ({samples.get('reason', 'none in the report')})")
        return
    print(f"\nsamples (greedy, up to {samples['max_new_tokens']} new tokens; samples.md holds them too)")
    for item in samples["items"]:
        print(f"  [{item['source']}] {item['prompt']!r}")
        for who in ("dense", "compressed"):
            if who in item:
                print(f"    {who:10} {item[who]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running service (default: start one)")
    ap.add_argument("--key-file", type=Path, help="API key file (default: <data dir>/api_key)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SVDFORGE_DATA_DIR", "var")))
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--keep-running", action="store_true", help="leave the started service running")
    args = ap.parse_args()

    proc = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        port = _pick_port(args.port)
        proc = start_service(args.data_dir.absolute(), port)
        base = f"http://127.0.0.1:{port}"
    key = os.environ.get("SVDFORGE_API_KEY") or (args.key_file or args.data_dir / "api_key").read_text().strip()
    ok = False
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            request = {"model": args.model, "ratio": args.ratio, "metadata": {"source": "make run"}}
            r = client.post("/v1/jobs", json=request, headers={"Idempotency-Key": str(uuid.uuid4())})
            if r.status_code != 201:
                raise SystemExit(f"job refused ({r.status_code}): {r.text}")
            job = r.json()
            print(f"submitted {job['id']} ({r.headers['location']}): {request}", flush=True)
            job = follow(client, job["id"])
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job['status']}: {job['error']}")
            timings = ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in job["stages"] if s["status"] == "completed")
            print(f"job succeeded: {timings}", flush=True)
            artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
            download(client, artifacts["model.safetensors"],
                     args.data_dir / "downloads" / job["id"] / "model.safetensors")
            report = client.get(f"/v1/jobs/{job['id']}/report").json()
            print_report(report)
            print_samples(report)
            ok = True
    finally:
        if proc is not None and not args.keep_running:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        elif proc is not None:
            print(f"\nthe service keeps running at {base} (pid {proc.pid}); stop it with Ctrl-C", flush=True)
            proc.wait()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

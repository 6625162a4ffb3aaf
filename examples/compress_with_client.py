"""Compress a model through the svdforge service using only the generated client.

    pip install ./clients/python
    svdforge serve &                                   # or any deployment of the API
    python examples/compress_with_client.py --url http://127.0.0.1:8000 --key-file var/api_key \
        --text ../shared/data/wikitext-2/valid.txt

It uploads a text file, submits a job on `smollm2-135m` (small settings: a few minutes on a
2-core CPU) calibrated on that file, follows its events with progress, downloads
`model.safetensors` (from the presigned `download_url` where the store gives one, else the
API's content endpoint), checks its sha256 against the artifact record, and prints the
metrics. The key comes from --key, $SVDFORGE_API_KEY or --key-file. Exit status 0 on success.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path

try:
    import svdforge_client  # noqa: F401 - only: is the client installed?
except ImportError:  # run from a checkout without installing the client
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from svdforge_client import AuthenticatedClient
from svdforge_client.api.files import upload_file
from svdforge_client.api.jobs import create_job, get_job, get_job_report, list_job_artifacts, list_job_events
from svdforge_client.models import (
    BodyUploadFile,
    BodyUploadFilePurpose,
    BuiltinEvaluation,
    FileData,
    JobCreate,
    JobStatus,
    Problem,
)
from svdforge_client.types import UNSET, File

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


def ok(result, what: str):
    """The parsed body, or exit with the server's problem document."""
    if result is None or isinstance(result, Problem):
        detail = f"{result.status} {result.code}: {result.detail}" if isinstance(result, Problem) else "no response"
        raise SystemExit(f"{what} failed: {detail}")
    return result


def api_key(args: argparse.Namespace) -> str:
    key = args.key or os.environ.get("SVDFORGE_API_KEY")
    if not key and args.key_file:
        key = Path(args.key_file).read_text().strip()
    if not key:
        raise SystemExit("no API key: pass --key, set SVDFORGE_API_KEY or pass --key-file")
    return key


def follow(client: AuthenticatedClient, job_id: str, timeout_s: float, poll_s: float):
    """Print the job's events (progress as one line per stage step) until it ends."""
    after, last_line = UNSET, ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page = ok(list_job_events.sync(job_id, client=client, after=after, limit=1000), "list_job_events")
        for e in page.data:
            stage = getattr(e.stage, "value", "") or ""
            if e.type_ == "progress":
                fraction = e.data["fraction"] if e.data and "fraction" in e.data else 0.0
                line = f"  {stage:8s} {100 * float(fraction):5.1f}%  {e.message}"
            else:
                line = f"  [{e.type_}] {stage} {e.message}".rstrip()
            if line != last_line:
                print(line, flush=True)
                last_line = line
        after = page.last_id or after
        job = ok(get_job.sync(job_id, client=client), "get_job")
        if job.status in TERMINAL and not page.has_more:
            return job
        if not page.has_more:
            time.sleep(poll_s)
    raise SystemExit(f"job {job_id} did not finish in {timeout_s:.0f} s")


def download(client: AuthenticatedClient, artifact, dest: Path) -> str:
    """Stream one artifact to `dest`; return the sha256 of the bytes received."""
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as f:
        if isinstance(artifact.download_url, str):  # presigned (S3): no API key goes to the store
            with urllib.request.urlopen(artifact.download_url, timeout=60) as resp:  # noqa: S310 - the https/http URL the API returned
                while block := resp.read(1 << 20):
                    digest.update(block)
                    f.write(block)
        else:  # download_job_artifact, streamed through the client's own httpx session
            with client.get_httpx_client().stream("GET", artifact.content_url) as resp:
                resp.raise_for_status()
                for block in resp.iter_bytes(1 << 20):
                    digest.update(block)
                    f.write(block)
                header = resp.headers.get("x-content-sha256")
                if header and header != digest.hexdigest():
                    raise SystemExit(f"{artifact.name}: X-Content-SHA256 {header} != received bytes")
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=os.environ.get("SVDFORGE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", help="API key (default: $SVDFORGE_API_KEY, then --key-file)")
    p.add_argument("--key-file", default="var/api_key", help="file holding the API key (svdforge serve's)")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text to calibrate on (one paragraph per line)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--eval-max-tokens", type=int, default=1024)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("out/client-example"))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the job")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    args = p.parse_args(argv)

    client = AuthenticatedClient(base_url=args.url.rstrip("/"), token=api_key(args), timeout=None)
    with client:
        uploaded = ok(upload_file.sync(client=client, body=BodyUploadFile(
            file=File(payload=args.text.open("rb"), file_name=args.text.name, mime_type="text/plain"),
            purpose=BodyUploadFilePurpose.CALIBRATION)), "upload_file")
        print(f"uploaded {args.text.name}: {uploaded.id} ({uploaded.bytes_} bytes)")

        body = JobCreate(
            model=args.model, ratio=args.ratio,
            calibration=FileData(source="file", file_id=uploaded.id, samples=args.calib_samples,
                                 seq_len=args.calib_seq_len),
            evaluation=BuiltinEvaluation(source="builtin", max_tokens=args.eval_max_tokens,
                                         seq_len=args.eval_seq_len, throughput=False))
        job = ok(create_job.sync(client=client, body=body, idempotency_key=str(uuid.uuid4())), "create_job")
        print(f"job {job.id} {job.status.value} ({args.model} at ratio {args.ratio})", flush=True)

        job = follow(client, job.id, args.timeout, args.poll)
        if job.status != JobStatus.SUCCEEDED:
            error = job.error.message if job.error else ""
            raise SystemExit(f"job {job.id} ended {job.status.value} {error}")

        artifacts = ok(list_job_artifacts.sync(job.id, client=client), "list_job_artifacts").data
        print("artifacts: " + ", ".join(f"{a.name} ({a.bytes_} B)" for a in artifacts))
        weights = next(a for a in artifacts if a.name == "model.safetensors")
        dest = args.out / job.id / weights.name
        digest = download(client, weights, dest)
        if digest != weights.sha256:
            raise SystemExit(f"sha256 mismatch: downloaded {digest}, artifact record {weights.sha256}")
        print(f"downloaded {dest} ({dest.stat().st_size} bytes), sha256 {digest} verified")

        report = ok(get_job_report.sync(job.id, client=client), "get_job_report").to_dict()
        metrics = report.get("metrics") or {}
        dense, comp = metrics.get("dense") or {}, metrics.get("compressed") or {}
        print(f"dense PPL {dense.get('ppl')}")
        for name in ("ppl", "teacher_kl", "top10_recall", "agreement"):
            print(f"compressed {name} {comp.get(name)}")
        params = report.get("params") or {}
        print(f"parameter reduction {params.get('reduction')}")
        for fig in (report.get("figures") or {}).values():
            print(f"figure {fig.get('name')}: {fig.get('content_url')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

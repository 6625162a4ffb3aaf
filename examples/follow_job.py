"""Follow a job's events live, over Server-Sent Events, with plain httpx.

    svdforge serve &
    python examples/follow_job.py job_... --url http://127.0.0.1:8000 --key-file var/api_key

`GET /v1/jobs/{id}/events` with `Accept: text/event-stream` streams the job's events and
closes after its final status event. When the connection drops before that (a restarted
API, a proxy's idle timeout), this reconnects with `Last-Event-ID`: the server resumes
after the last event received, so nothing is lost or printed twice. When the answer is
not an event stream (a proxy that buffers or rewrites it, an older server), it falls back
to polling the JSON list with `after=`. Each event is printed as one line; with `--json`,
as the event object itself (one JSON document per line). Exit status: 0 when the job
succeeded, 1 when it failed or was cancelled, 2 when it could not be followed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

EVENT_STREAM = "text/event-stream"
FINAL = {"succeeded", "failed", "cancelled"}


class FollowError(Exception):
    """The server refused (an HTTP error with its problem document) or the deadline passed."""


def sse_messages(lines: Iterator[str]) -> Iterator[dict]:
    """`{"id", "event", "data"}` per message of a text/event-stream; keep-alive comments skipped."""
    msg: dict = {}
    for line in lines:
        if line == "":
            if "data" in msg:
                yield msg
            msg = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                msg["data"] = msg["data"] + "\n" + value if "data" in msg else value
            elif name in ("id", "event"):
                msg[name] = value


def is_final(event: dict) -> bool:
    return event["type"] == "status" and (event.get("data") or {}).get("to") in FINAL


def refused(r: httpx.Response) -> FollowError:
    r.read()
    try:
        detail = r.json().get("detail") or r.text
    except ValueError:
        detail = r.text
    return FollowError(f"HTTP {r.status_code}: {detail}")


def stream(client: httpx.Client, job_id: str, last_id: str | None, on_event: Callable[[dict], None]) -> str:
    """One connection: "done" after the final status event, "closed" if it ended before, or
    "no-stream" if the answer was not an event stream. A dropped connection raises httpx's error."""
    headers = {"Accept": EVENT_STREAM, **({"Last-Event-ID": last_id} if last_id else {})}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        if r.status_code != 200:
            raise refused(r)
        if not r.headers.get("content-type", "").startswith(EVENT_STREAM):
            r.read()
            return "no-stream"
        for msg in sse_messages(r.iter_lines()):
            event = json.loads(msg["data"])
            on_event(event)
            if is_final(event):
                return "done"
    return "closed"


def poll(client: httpx.Client, job_id: str, last_id: str | None, on_event: Callable[[dict], None],
         poll_s: float, deadline: float) -> dict:
    """The fallback: page through the JSON list with `after=` until the final status event."""
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000, **({"after": last_id} if last_id else {})})
        if r.status_code != 200:
            raise refused(r)
        page = r.json()
        for event in page["data"]:
            last_id = event["id"]
            on_event(event)
            if is_final(event):
                return event
        if not page["has_more"]:
            time.sleep(poll_s)
    raise FollowError(f"job {job_id} did not finish in time")


def follow(client: httpx.Client, job_id: str, on_event: Callable[[dict], None], *, timeout_s: float = 3600.0,
           poll_s: float = 1.0, retry_s: float = 1.0) -> dict:
    """Every event of the job, once each and in order, to `on_event`; returns the final status event."""
    deadline = time.monotonic() + timeout_s
    last_id, final, wait = None, None, retry_s

    def seen(event: dict) -> None:  # the last id is kept here: a connection can drop in mid-stream
        nonlocal final, last_id
        final, last_id = (event if is_final(event) else None), event["id"]
        on_event(event)

    while time.monotonic() < deadline:
        try:
            how = stream(client, job_id, last_id, seen)
        except httpx.TransportError as e:  # refused, reset, timed out: try again from the last id
            print(f"connection lost ({type(e).__name__}); reconnecting after {last_id}", file=sys.stderr)
            how = "closed"
        if how == "done":
            return final
        if how == "no-stream":
            print("no event stream here: polling", file=sys.stderr)
            return poll(client, job_id, last_id, seen, poll_s, deadline)
        time.sleep(min(wait, max(deadline - time.monotonic(), 0)))
        wait = min(wait * 2, 10 * retry_s)
    raise FollowError(f"job {job_id} did not finish in {timeout_s:.0f} s")


def line(event: dict) -> str:
    parts = [event["id"], event["type"], event.get("stage") or ""]
    if event["type"] == "progress":
        parts.append(f"{100 * float((event.get('data') or {}).get('fraction', 0.0)):.1f}%")
    return " ".join(p for p in [*parts, event["message"]] if p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job_id")
    p.add_argument("--url", default=os.environ.get("SVDFORGE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", help="API key (default: $SVDFORGE_API_KEY, then --key-file)")
    p.add_argument("--key-file", default="var/api_key", help="file holding the API key (svdforge serve's)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the job at most")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls when there is no stream")
    p.add_argument("--json", action="store_true", help="print each event object as one line of JSON")
    args = p.parse_args(argv)
    key = args.key or os.environ.get("SVDFORGE_API_KEY")
    if not key:
        key_file = Path(args.key_file)
        if not key_file.is_file():
            print("no API key: pass --key, set SVDFORGE_API_KEY or pass --key-file", file=sys.stderr)
            return 2
        key = key_file.read_text().strip()

    def show(event: dict) -> None:
        print(json.dumps(event) if args.json else line(event), flush=True)

    # keep-alive comments arrive every ~15 s: a connection silent for much longer than that is dead
    timeout = httpx.Timeout(30.0, read=120.0)
    with httpx.Client(base_url=args.url.rstrip("/"), headers={"Authorization": f"Bearer {key}"},
                      timeout=timeout) as client:
        try:
            final = follow(client, args.job_id, show, timeout_s=args.timeout, poll_s=args.poll)
        except FollowError as e:
            print(e, file=sys.stderr)
            return 2
    print(f"job {args.job_id} {final['data']['to']}")
    return 0 if final["data"]["to"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())

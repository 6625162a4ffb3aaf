"""The webhook dispatcher: sends the outbox's due deliveries, from every worker process.

A thread next to the reaper polls every `webhooks_poll_s`: a read finds due deliveries,
one short transaction claims them (a lease on each row, compare-and-set, so any number of
dispatchers can run), they are sent on a small thread pool, and each attempt is recorded in
its own transaction. A job never waits for a webhook and never fails because of one: the job's
change was committed before anything is sent, and the sending happens in this thread.

Each attempt checks the URL again (`persistence.urlguard`: the host may now resolve
elsewhere) and connects to the addresses it checked, with the original host in `Host` and
in TLS (SNI and certificate), so a DNS answer that changes between the check and the
connection cannot point it at a private address. Redirects are not followed; only a 2xx
counts as delivered. The response body is never read.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from svdforge.persistence.db import Database
from svdforge.persistence.settings import Settings
from svdforge.persistence.tables import utcnow
from svdforge.persistence.urlguard import Target, UnsafeURL, check_url
from svdforge.persistence.webhooks import Attempt, Claim, body_bytes, claim_due, due_ids, record_attempt, sign

log = logging.getLogger("svdforge.webhooks")

BATCH = 32        # deliveries claimed per poll
SEND_THREADS = 8  # sent at once (a slow receiver holds one thread, up to the timeout)
USER_AGENT = "svdforge-webhooks/1"


def make_client(settings: Settings) -> httpx.Client:
    """No proxies from the environment (they would defeat the address pinning), no redirects."""
    return httpx.Client(timeout=httpx.Timeout(settings.webhooks_timeout_s), follow_redirects=False,
                        trust_env=False, headers={"user-agent": USER_AGENT})


def _post(client: httpx.Client, target: Target, address: str, headers: dict[str, str], body: bytes) -> int:
    """POST to `address`, as if to the URL's host; the status code (the body is not read)."""
    url = httpx.URL(target.url).copy_with(host=address, port=target.port)
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = {"http": 80, "https": 443}[target.scheme]
    extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.host != address else {}
    request = client.build_request("POST", url, content=body, extensions=extensions, headers={
        **headers, "host": host if target.port == default else f"{host}:{target.port}"})
    response = client.send(request, stream=True)
    response.close()
    return response.status_code


def deliver(client: httpx.Client, claim: Claim, *, allow_private: bool) -> Attempt:
    """One attempt: check the URL, sign, POST to each checked address until one connects."""
    at, start = utcnow(), time.monotonic()

    def done(status: int | None, error: str | None) -> Attempt:
        return Attempt(at, status, error, int((time.monotonic() - start) * 1000))

    try:
        target = check_url(claim.url, allow_private=allow_private)
    except UnsafeURL as e:
        return done(None, f"url refused: {e}")
    body = body_bytes(claim.payload)
    timestamp = int(at.timestamp())
    headers = {"content-type": "application/json", "webhook-id": claim.id, "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(claim.secret, claim.id, timestamp, body)}
    error = "no address to connect to"
    for address in target.addresses:
        try:
            status = _post(client, target, address, headers, body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # the next address may answer
            error = f"could not connect to {address}: {e or type(e).__name__}"
            continue
        except httpx.HTTPError as e:
            return done(None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        return done(status, None if 200 <= status < 300 else f"HTTP {status}")
    return done(None, error)


class Dispatcher:
    def __init__(self, db: Database, settings: Settings, client: httpx.Client | None = None) -> None:
        self.db, self.settings = db, settings
        self.client = client or make_client(settings)
        self._pool = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="svdforge-webhook")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lease_s(self) -> float:
        """Longer than any attempt can take (connect to a few addresses, send, read the status line)."""
        return 4 * self.settings.webhooks_timeout_s + 30

    def run_once(self) -> dict[str, str | None]:
        """One poll: send what is due; returns each claimed delivery's status after its attempt
        (None: the claim was lost meanwhile)."""
        now = utcnow()
        with self.db.session() as s:  # most polls find nothing: no write lock for them
            candidates = due_ids(s, now, BATCH)
        if not candidates:
            return {}
        with self.db.begin() as s:
            claims = claim_due(s, candidates, now, self.lease_s)
        attempts = list(self._pool.map(
            lambda c: deliver(self.client, c, allow_private=self.settings.webhooks_allow_private), claims))
        out = {}
        for claim, attempt in zip(claims, attempts, strict=True):
            with self.db.begin() as s:
                out[claim.id] = record_attempt(s, claim, attempt, self.settings.webhooks_retry_schedule_s)
            log.info("webhook %s delivery %s attempt %d: %s -> %s", claim.webhook_id, claim.id, claim.attempts + 1,
                     attempt.status_code or attempt.error, out[claim.id])
        return out

    # --- the periodic thread ---------------------------------------------------------
    def start(self) -> Dispatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="svdforge-webhooks", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhooks_timeout_s + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = len(self.run_once()) == BATCH
            except Exception:  # a database outage: try again next time
                log.exception("webhook dispatch failed")
                busy = False
            if not busy:  # a full batch: more may be due at once
                self._stop.wait(self.settings.webhooks_poll_s)

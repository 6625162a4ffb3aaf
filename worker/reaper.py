"""The reaper: puts the jobs of lost workers back in the queue, from every worker process.

A worker that dies (kill -9, OOM, a lost machine) stops renewing its job's lease. Every
`reap_interval_s` (default a third of the lease) a thread in each worker process sweeps the
database: a running job whose lease ran out is requeued (or failed with `worker_lost` once
it has used `max_attempts`), a cancelling one is cancelled, and every queued job that needs
a queue message gets one: never sent (the API could not reach the broker, a requeue), or
sent `resend_after_s` ago and still not started (a broker that lost its messages). Each
change is a conditional UPDATE, so any number of reapers can run at once. The queue is only
a wake-up call: the database decides what runs, so a duplicate message costs one read.

Celery's own redelivery (visibility timeout) is not what recovers jobs: it waits an hour by
default and cannot tell a dead worker from a slow one; the lease can.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from svdforge.persistence.db import Database
from svdforge.persistence.jobs import Recovery, artifact_prefix, claim_sends, recover_orphans, unmark_sent
from svdforge.persistence.settings import Settings
from svdforge.persistence.storage import Storage, StorageError
from svdforge.persistence.tables import utcnow

log = logging.getLogger("svdforge.reaper")


class Reaper:
    def __init__(self, db: Database, storage: Storage, settings: Settings, send: Callable[[str], None]) -> None:
        self.db, self.storage, self.settings, self.send = db, storage, settings, send
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, *, everything_active: bool = False) -> tuple[Recovery, list[str]]:
        """One pass; returns what was recovered and the ids whose message was sent."""
        now = utcnow()
        with self.db.begin() as s:
            found = recover_orphans(s, max_attempts=self.settings.max_attempts,
                                    everything_active=everything_active, now=now)
        for job_id in found.cancelled + found.failed:  # ended: none of their files are needed
            try:
                self.storage.delete_prefix(artifact_prefix(job_id))
            except StorageError:
                log.exception("job %s: could not delete its files", job_id, extra={"job_id": job_id})
        with self.db.begin() as s:
            due = claim_sends(s, now=now, grace_s=self.settings.enqueue_grace_s,
                              resend_after_s=self.settings.resend_after_s)
        failed = []
        for job_id in due:
            try:
                self.send(job_id)
            except Exception as e:  # noqa: BLE001 - the broker is down: the next sweep tries again
                log.warning("job %s: could not send its queue message: %s", job_id, e, extra={"job_id": job_id})
                failed.append(job_id)
        if failed:
            with self.db.begin() as s:
                unmark_sent(s, failed, now)
        sent = [j for j in due if j not in failed]
        if found.requeued or found.failed or found.cancelled or sent:
            log.info("reaper: requeued %s, failed %s, cancelled %s, sent %s",
                     found.requeued, found.failed, found.cancelled, sent)
        return found, sent

    # --- the periodic thread ---------------------------------------------------------
    def start(self) -> Reaper:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="svdforge-reaper", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # a database outage: try again next time
                log.exception("reaper sweep failed")
            self._stop.wait(self.settings.reap_every_s)

"""The service's figures, read from the database when Prometheus scrapes (a custom Collector).

Jobs, the queue, the workers' outcomes and stage timings all live in the database: the
worker writes them there (status, `stages` with each stage's seconds, `Artifact` rows), so
one scrape target (the API) reports them for the embedded worker and for any number of
Celery workers alike, and every API replica reports the same values. A scrape costs a few
aggregate queries plus one read of the jobs that finished since the last scrape.

Durations: a finished job's `started_at -> finished_at` (by outcome) and its completed
stages' `seconds` (by stage) go into histograms. The first scrape of a process reads every
finished job once; later ones read only those whose `finished_at` is past the newest one
seen (less an overlap, for transactions that commit out of order; ids seen within it are
not counted twice). So the histograms count every job in the database, in any process.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select

from svdforge.persistence.db import Database
from svdforge.persistence.state import TERMINAL, JobStatus, Stage
from svdforge.persistence.tables import Artifact, File, Job, utcnow

log = logging.getLogger("svdforge.metrics")

JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
OVERLAP = timedelta(minutes=10)


class Buckets:
    """One histogram series: counts per upper bound (cumulated when exposed), sum, count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def exposed(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*(str(b) for b in self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class FinishedJobs:
    """Job and stage durations of finished jobs, read incrementally (see the module's doc)."""

    def __init__(self) -> None:
        self.jobs = {s.value: Buckets(JOB_BUCKETS) for s in sorted(TERMINAL)}
        self.stages = {s.value: Buckets(STAGE_BUCKETS) for s in Stage}
        self._newest: datetime | None = None
        self._recent: dict[str, datetime] = {}  # finished within OVERLAP of the newest: not counted again

    def update(self, session) -> None:
        q = select(Job.id, Job.status, Job.started_at, Job.finished_at, Job.stages).where(
            Job.status.in_([s.value for s in TERMINAL]), Job.finished_at.is_not(None))
        if self._newest is not None:
            q = q.where(Job.finished_at > self._newest - OVERLAP)
        for row in session.execute(q):
            if row.id in self._recent:
                continue
            self._recent[row.id] = row.finished_at
            self._newest = row.finished_at if self._newest is None else max(self._newest, row.finished_at)
            if row.started_at is not None:  # a job cancelled while queued never ran
                self.jobs[row.status].observe(max(0.0, (row.finished_at - row.started_at).total_seconds()))
            for name, info in (row.stages or {}).items():
                seconds = info.get("seconds") if isinstance(info, dict) else None
                if name in self.stages and info.get("status") == "completed" and isinstance(seconds, (int, float)):
                    self.stages[name].observe(max(0.0, float(seconds)))
        if self._newest is not None:
            cutoff = self._newest - OVERLAP
            self._recent = {k: v for k, v in self._recent.items() if v > cutoff}


def _histogram(name: str, doc: str, label: str, series: dict[str, Buckets]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, b in series.items():
        family.add_metric([value], b.exposed(), sum_value=b.sum)
    return family


class ServiceCollector(Collector):
    """`svdforge_*` families from the database; `svdforge_database_up 0` when it does not answer."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()  # scrapes may come from two threads (API and metrics port)
        self._finished = FinishedJobs()

    def describe(self) -> list[Metric]:
        return []  # families are known at collect time only; registering must not query the database

    def collect(self) -> Iterator[Metric]:
        began = time.perf_counter()
        try:
            with self._lock, self.db.session() as s:
                families = self._read(s)
        except Exception:  # a scrape never fails: it says the database is down
            log.exception("metrics: the database did not answer")
            families = []
        up = GaugeMetricFamily("svdforge_database_up", "1 if the metrics' database queries succeeded")
        up.add_metric([], 1.0 if families else 0.0)
        took = GaugeMetricFamily("svdforge_metrics_collect_seconds", "Time this scrape spent in the database")
        took.add_metric([], time.perf_counter() - began)
        yield from (*families, up, took)

    def _read(self, s) -> list[Metric]:
        now = utcnow()
        by_status = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED.value))
        busy = s.scalar(select(func.count(distinct(Job.worker_id))).where(Job.status.in_(["running", "cancelling"])))
        expired = s.scalar(select(func.count()).where(Job.status.in_(["running", "cancelling"]),
                                                        Job.lease_expires_at < now))
        failures = s.execute(select(Job.error_code, func.count()).where(Job.status == JobStatus.FAILED.value)
                             .group_by(Job.error_code)).all()
        n_art, art_bytes = s.execute(select(func.count(), func.coalesce(func.sum(Artifact.bytes), 0))).one()
        n_files, file_bytes = s.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0))).one()
        self._finished.update(s)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        jobs = GaugeMetricFamily("svdforge_jobs", "Jobs by status, now", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status.value, 0))
        outcomes = CounterMetricFamily("svdforge_jobs_finished", "Jobs that ended, by outcome", labels=["outcome"])
        for status in sorted(TERMINAL):
            outcomes.add_metric([status.value], by_status.get(status.value, 0))
        failed = CounterMetricFamily("svdforge_jobs_failed", "Failed jobs by error code", labels=["code"])
        for code, n in sorted(failures, key=lambda r: r[0] or ""):
            failed.add_metric([code or "unknown"], n)
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        return [jobs, outcomes, failed,
                gauge("svdforge_queue_depth", "Jobs waiting for a worker (status queued)", by_status.get("queued", 0)),
                gauge("svdforge_queue_oldest_age_seconds", "Age of the oldest queued job (0: none)", max(0.0, age)),
                gauge("svdforge_workers_busy", "Workers running a job (distinct worker ids of running jobs)", busy),
                gauge("svdforge_jobs_lease_expired", "Running jobs whose worker stopped renewing the lease", expired),
                gauge("svdforge_artifacts", "Artifact files stored", n_art),
                gauge("svdforge_artifact_bytes", "Bytes of artifact files stored", art_bytes),
                gauge("svdforge_files", "Uploaded files stored", n_files),
                gauge("svdforge_file_bytes", "Bytes of uploaded files stored", file_bytes),
                _histogram("svdforge_job_duration_seconds", "Finished jobs' running time (started to finished), "
                           "by outcome", "outcome", self._finished.jobs),
                _histogram("svdforge_job_stage_duration_seconds", "Completed stages' seconds, of finished jobs",
                           "stage", self._finished.stages)]

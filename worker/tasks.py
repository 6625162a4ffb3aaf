"""The Celery task: the message is only a job id; `JobRunner` does the work.

One runner (database engine, storage client) per worker process, built on first use so
that the API, which imports this module through the Celery app, never builds one.
"""
from __future__ import annotations

import logging
from functools import lru_cache

from celery.signals import worker_ready, worker_shutting_down

from persistence.db import Database
from persistence.jobs import recover_orphans
from persistence.settings import get_settings
from persistence.storage import make_storage
from worker.app import RUN_JOB, celery_app, enqueue
from worker.runner import JobRunner

log = logging.getLogger("svdforge.worker")


@lru_cache(maxsize=1)
def get_runner() -> JobRunner:
    settings = get_settings()
    settings.ensure_dirs()
    if settings.worker_threads:
        import torch

        torch.set_num_threads(settings.worker_threads)
    return JobRunner(Database(settings), make_storage(settings), settings)


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    status = get_runner().run(job_id)
    log.info("job %s: %s", job_id, status)
    return status


@worker_ready.connect
def _sweep_on_start(sender=None, **_kwargs) -> None:  # noqa: ANN001
    """Queue what a crash or a broker outage left behind (jobs with expired leases, unsent jobs)."""
    runner = get_runner()
    with runner.db.begin() as s:
        found = recover_orphans(s, max_attempts=runner.settings.max_attempts)
    for prefix_job in found.cancelled:
        runner.delete_artifacts(prefix_job)
    for job_id in found.requeued + found.unqueued:
        enqueue(sender.app if sender is not None else celery_app, job_id)
    if found.requeued or found.unqueued or found.failed or found.cancelled:
        log.info("recovered jobs: %s", found)


@worker_shutting_down.connect
def _stop_running_job(**_kwargs) -> None:  # noqa: ANN003
    """Warm shutdown: the running job stops at its next stage or layer boundary and is requeued."""
    get_runner().stopping.set()

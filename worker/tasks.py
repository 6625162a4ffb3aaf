"""The Celery task: the message is only a job id; `JobRunner` does the work.

One runner (database engine, storage client) per worker process, built on first use, not
when Celery imports this module.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from functools import lru_cache

from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutting_down

from svdforge.persistence.db import Database
from svdforge.persistence.logs import log_context
from svdforge.persistence.queue import RUN_JOB, enqueue
from svdforge.persistence.settings import get_settings
from svdforge.persistence.storage import make_storage
from svdforge.worker.app import celery_app
from svdforge.worker.reaper import Reaper
from svdforge.worker.runner import JobRunner
from svdforge.worker.webhooks import Dispatcher

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
    return get_runner().run(job_id)  # which logs the job's end, with its id


_scopes: dict[str, ExitStack] = {}  # task id -> the log scope of its job, open while Celery traces it


@task_prerun.connect
def _open_job_scope(task_id=None, task=None, args=(), **_kwargs) -> None:
    """Celery's own lines about the task (its outcome and time) carry the job's id too."""
    if getattr(task, "name", None) == RUN_JOB and args:
        stack = ExitStack()
        stack.enter_context(log_context(job_id=str(args[0])))
        _scopes[task_id] = stack


@task_postrun.connect
def _close_job_scope(task_id=None, **_kwargs) -> None:
    stack = _scopes.pop(task_id, None)
    if stack is not None:
        stack.close()


@lru_cache(maxsize=1)
def get_reaper() -> Reaper:
    runner = get_runner()
    return Reaper(runner.db, runner.storage, runner.settings, lambda job_id: enqueue(celery_app, job_id))


@lru_cache(maxsize=1)
def get_dispatcher() -> Dispatcher:
    runner = get_runner()
    return Dispatcher(runner.db, runner.settings)


def _warm_up() -> None:
    """Import the pipeline's heavy modules (torch, transformers, matplotlib: seconds) before the
    worker takes its first job, rather than while it holds one. In the worker's main thread:
    transformers' lazy imports are not safe to run from two threads at once."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401 - imported to warm up only
        import transformers.models.auto.modeling_auto  # noqa: F401 - imported to warm up only

        import svdforge.core.pipeline  # noqa: F401 - imported to warm up only
    except Exception:  # only an optimisation: the job imports them itself
        log.debug("warm-up failed", exc_info=True)


@worker_ready.connect
def _start_reaper(sender=None, **_kwargs) -> None:
    """Sweep once now (what a crash or a broker outage left behind), then every reap interval;
    send webhook deliveries (what is due now, then as they come)."""
    get_reaper().start()
    get_dispatcher().start()
    _warm_up()


@worker_shutting_down.connect
def _stop_running_job(**_kwargs) -> None:
    """Warm shutdown: the running job stops at its next stage or layer boundary and is requeued."""
    get_runner().stopping.set()
    get_reaper().stop()
    get_dispatcher().stop()

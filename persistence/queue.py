"""The job queue: the Celery app factory and `enqueue`, shared by the API (which sends) and
the worker (which consumes). Light on purpose: the API imports it, so no torch here.

The queue carries only a job id; the database holds everything else, so no result
backend is configured and results are ignored. One job at a time per worker
(prefetch 1, late ack): a message is acknowledged when its job has ended. A worker that
dies mid-job is not recovered by Celery, though (Redis would redeliver only after the
visibility timeout, an hour): its job's lease in the database runs out and a reaper thread
in the other workers requeues it (`svdforge.worker.reaper`). A redelivered or duplicate message is
harmless: the claim runs a job only if its row says it is queued.

Embedded mode uses kombu's filesystem transport (messages are files under
`<data_dir>/queue`): no server to run, and the same task code as with Redis.

The sending side needs no task code: `enqueue` sends by task name. A worker's app is
built by the same factory, with its task modules to import (`include`).
"""
from __future__ import annotations

from collections.abc import Sequence

from celery import Celery

from svdforge.persistence.settings import Settings

QUEUE = "gpu"
RUN_JOB = "svdforge.run_job"
# An API request should not hang on a dead broker: a few quick tries, then the job waits
# in the database (enqueued_at empty) for the next recovery sweep.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """A Celery app on the settings' broker; `include` names the task modules a worker imports."""
    app = Celery("svdforge", broker=settings.broker_url, include=list(include))
    transport_options: dict = {}
    if settings.is_filesystem_broker:
        folder = str(settings.queue_dir)
        transport_options = {"data_folder_in": folder, "data_folder_out": folder,
                             "control_folder": str(settings.queue_dir / "control")}
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        transport_options = {"visibility_timeout": settings.broker_visibility_timeout_s}
    app.conf.update(
        task_default_queue=QUEUE,
        task_routes={RUN_JOB: {"queue": QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=not settings.is_filesystem_broker,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        broker_pool_limit=10,  # producer connections shared by the API's threads (publishing takes < 1 ms)
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def enqueue(app: Celery, job_id: str) -> None:
    """Send the job's id to the `gpu` queue (call only after the job row is committed)."""
    app.send_task(RUN_JOB, args=[job_id], queue=QUEUE, retry=True, retry_policy=PUBLISH_RETRY)

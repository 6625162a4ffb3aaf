"""The worker's Celery app: `celery -A svdforge.worker.app worker` finds it here.

Built from `SVDFORGE_*` settings by the queue's factory (`svdforge.persistence.queue`, which
the API uses to send), with the task module (`svdforge.worker.tasks`) to import. Logging is
svdforge's (`persistence.logs`: `SVDFORGE_LOG_FORMAT`, `SVDFORGE_LOG_LEVEL`) instead of
Celery's own: handling `setup_logging` tells Celery to leave the root logger alone.
"""
from __future__ import annotations

from celery.signals import setup_logging

from svdforge.persistence.logs import configure_logging
from svdforge.persistence.queue import make_celery
from svdforge.persistence.settings import get_settings

celery_app = make_celery(get_settings(), include=["svdforge.worker.tasks"])
app = celery_app  # `celery -A svdforge.worker.app worker` finds it under this name


@setup_logging.connect
def _configure_logging(**_kwargs) -> None:
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)

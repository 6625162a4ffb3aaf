"""The worker's Celery app: `celery -A svdforge.worker.app worker` finds it here.

Built from `SVDFORGE_*` settings by the queue's factory (`svdforge.persistence.queue`, which
the API uses to send), with the task module (`svdforge.worker.tasks`) to import.
"""
from __future__ import annotations

from svdforge.persistence.queue import make_celery
from svdforge.persistence.settings import get_settings

celery_app = make_celery(get_settings(), include=["svdforge.worker.tasks"])
app = celery_app  # `celery -A svdforge.worker.app worker` finds it under this name

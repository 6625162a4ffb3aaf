"""The FastAPI app: `create_app(settings)` builds one around a data folder.

Production: `uvicorn --factory svdforge.api.main:create_app` (settings from SVDFORGE_* variables).
Embedded: `svdforge serve` runs it next to a worker. The app does not migrate the
database: `svdforge migrate` (or `serve`) does that once, before any process starts.
"""
from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from svdforge.api import event_stream, observe, openapi, problems, ui
from svdforge.api.deps import reject_unknown_query
from svdforge.api.limits import BodyLimitMiddleware, KeyBeforeBodyMiddleware
from svdforge.api.routes import files, health, jobs, webhooks
from svdforge.persistence.db import Database
from svdforge.persistence.jobs import API_PREFIX
from svdforge.persistence.logs import configure_logging
from svdforge.persistence.queue import make_celery
from svdforge.persistence.settings import Settings, get_settings
from svdforge.persistence.storage import make_storage

VERSION = "0.1.0"
TAGS = [
    {"name": "jobs", "description": "Compression jobs: create, follow, cancel, read reports, download artifacts."},
    {"name": "files", "description": "Uploaded text for calibration, training or evaluation."},
    {"name": "webhooks", "description": "Endpoints that receive your jobs' events, signed (Standard Webhooks)."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.ensure_dirs()
    configure_logging(settings.log_format, settings.log_level)
    db = Database(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Everything built so far (FastAPI, pydantic, SQLAlchemy, Celery: ~100k objects) lives
        # as long as the process: out of the collector's sight, a full collection takes ~10 ms
        # instead of ~100 ms, a pause every request in flight used to wait for (p99 latency,
        # bench/api_load.py). Shutdown hands them back, for processes that build many apps.
        gc.freeze()
        metrics_server = observe.start_port(app)
        try:
            yield
        finally:
            await app.state.event_poller.close()
            observe.stop_port(metrics_server)
            gc.unfreeze()
            db.dispose()

    app = FastAPI(title="svdforge", version=VERSION, openapi_tags=TAGS, lifespan=lifespan,
                  description="Compress Hugging Face causal LMs by truncation-aware SVD, as a job service. "
                              "Errors are RFC 9457 problem documents (`application/problem+json`).")
    app.state.settings = settings
    app.state.db = db
    app.state.event_poller = event_stream.Poller(db, settings.sse_poll_s)  # its task starts with the first stream
    app.state.storage = make_storage(settings)
    app.state.celery = make_celery(settings)
    problems.install(app)
    observe.install(app, settings)  # request ids, access lines, /metrics: around everything below
    # inner: runs after the size check, which needs no database
    app.add_middleware(KeyBeforeBodyMiddleware, prefix=f"{API_PREFIX}/")
    app.add_middleware(BodyLimitMiddleware, default_limit=1024 * 1024,
                       limits={f"{API_PREFIX}{files.router.prefix}": settings.max_upload_bytes + 64 * 1024})
    strict_query = [Depends(reject_unknown_query)]
    app.include_router(health.router, dependencies=strict_query)
    app.include_router(jobs.router, prefix=API_PREFIX, dependencies=strict_query)
    app.include_router(files.router, prefix=API_PREFIX, dependencies=strict_query)
    app.include_router(webhooks.router, prefix=API_PREFIX, dependencies=strict_query)
    ui.install(app)  # the dashboard at /ui (not in the OpenAPI document)
    openapi.install(app)
    return app

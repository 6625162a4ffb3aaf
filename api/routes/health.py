"""/healthz (the process answers) and /readyz (database, broker and storage answer)."""
from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from svdforge.api.problems import PROBLEM_JSON
from svdforge.api.routes.common import problems
from svdforge.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health()


def _check(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as e:  # noqa: BLE001 - report what failed, never raise
        return f"failed: {type(e).__name__}: {str(e)[:200]}"


def check_database(request: Request) -> None:
    with request.app.state.db.session() as s:
        s.execute(text("SELECT 1"))


def check_broker(request: Request) -> None:
    with request.app.state.celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        if conn.transport_cls == "filesystem":  # the queue folder must exist and take files
            folder = conn.transport_options["data_folder_in"]
            if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
                raise OSError(f"queue folder {folder} is missing or not writable")


@router.get("/readyz", operation_id="readyz", response_model=Readiness, responses=problems(503),
            summary="Readiness: database, broker and storage")
def readyz(request: Request) -> Readiness | JSONResponse:
    checks = {"database": _check(lambda: check_database(request)),
              "broker": _check(lambda: check_broker(request)),
              "storage": _check(request.app.state.storage.check)}
    if all(v == "ok" for v in checks.values()):
        return Readiness(status="ok", checks=checks)
    failed = ", ".join(k for k, v in checks.items() if v != "ok")
    body = {"type": "urn:svdforge:problem:unavailable", "title": "Service Unavailable", "status": 503,
            "detail": f"not ready: {failed}", "instance": "/readyz", "code": "unavailable",
            "checks": checks}
    return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)

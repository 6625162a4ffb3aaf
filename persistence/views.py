"""The public JSON of a job, as `GET /v1/jobs/{id}` returns it, built from its row.

One rendering for the API (its `JobOut` is validated from it) and for the webhook outbox,
which stores it in the transaction of a status change, where no API schema is at hand.
Timestamps are written the way pydantic writes them (`...Z`), so the two agree byte for byte.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic_core import to_jsonable_python

from svdforge.persistence.status import JobStatus, Stage
from svdforge.persistence.tables import Job


def _time(value: datetime | str | None) -> str | None:
    """A stored timestamp (aware datetime, or an ISO string in `stages`) in pydantic's JSON form."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return to_jsonable_python(value)


def _unit(value: Any) -> float:
    return min(max(float(value or 0.0), 0.0), 1.0)


def stage_documents(job: Job) -> list[dict[str, Any]]:
    """Every stage in order; the ones a job has not reached are pending (or skipped)."""
    recorded = job.stages or {}
    request = job.request or {}
    skipped = set()
    if (request.get("adapter") or {}).get("type", "none") == "none":
        skipped.add(Stage.RECOVER.value)
    if not (request.get("evaluation") or {}).get("enabled", True):
        skipped.add(Stage.EVALUATE.value)
    out = []
    for stage in Stage:
        info = recorded.get(stage.value)
        if info is None:
            status = "skipped" if stage.value in skipped or job.status == JobStatus.SUCCEEDED else "pending"
            info = {"status": status}
        out.append({"name": stage.value, "status": info.get("status", "pending"),
                    "started_at": _time(info.get("started_at")), "finished_at": _time(info.get("finished_at")),
                    "seconds": float(info.get("seconds") or 0.0), "progress": _unit(info.get("progress"))})
    return out


def job_document(job: Job) -> dict[str, Any]:
    """The job's public JSON (`JobOut`). A stored request keeps only the one of `ratio` / `ratios` /
    `target` it uses; the document shows the others as null, as the request schema does."""
    error = None
    if job.error_code:
        error = {"code": job.error_code, "message": job.error_message or "", "stage": job.error_stage}
    return {"object": "job", "id": job.id, "status": JobStatus(job.status).value, "model": job.model,
            "stage": job.stage, "progress": _unit(job.progress), "stages": stage_documents(job),
            "attempt": job.attempt, "error": error, "created_at": _time(job.created_at),
            "updated_at": _time(job.updated_at), "started_at": _time(job.started_at),
            "finished_at": _time(job.finished_at), "cancel_requested_at": _time(job.cancel_requested_at),
            "metadata": job.meta or {}, "request": {"ratio": None, "ratios": None, "target": None,
                                                                  **(job.request or {})}}

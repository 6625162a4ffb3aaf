"""Pieces shared by the routers: declared error responses, cursors, object rendering."""
from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import Query, Request

from svdforge.api.problems import field_error
from svdforge.api.schemas import ArtifactOut, FileOut, JobEventOut, JobOut, Problem, StageOut
from svdforge.persistence.ids import is_id
from svdforge.persistence.settings import Settings
from svdforge.persistence.state import Stage
from svdforge.persistence.storage import Storage
from svdforge.persistence.tables import Artifact, File, Job, JobEvent, utcnow
from svdforge.persistence.views import job_document, stage_documents


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses (rendered as application/problem+json, see api.openapi)."""
    text = {400: "Bad request", 401: "Missing or invalid API key", 404: "Not found (or not yours)",
            409: "Conflict with the object's current state", 413: "Request body too large",
            415: "The body is not application/json",
            416: "Range not satisfiable", 422: "Validation error naming the field",
            503: "A dependency is unavailable"}
    return {s: {"model": Problem, "description": text.get(s, "Error")} for s in statuses}


Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
After = Annotated[str | None, Query(max_length=64, description="Cursor: the last id of the previous page.")]


def cursor(after: str | None, prefix: str) -> str | None:
    """`after` checked as an id of the listed kind (`prefix_` + 22 base32 characters): a
    malformed cursor is a 422 naming `after`, not a silently empty page (an empty one is no
    cursor, as on /events)."""
    if after and not is_id(after, prefix):
        raise field_error("after", f"must be an id like {prefix}_01m8tqeengrrm2jrwfp27v: "
                                   "the last_id of the previous page")
    return after


def page(rows: list[Any], limit: int) -> tuple[list[Any], bool]:
    """Rows were fetched with limit + 1: the extra one only says there is more."""
    return rows[:limit], len(rows) > limit


def list_response(cls, data: list[Any], has_more: bool):
    """A cursor-paginated list object: the items plus the ids a client pages with."""
    return cls(data=data, has_more=has_more, first_id=data[0].id if data else None,
               last_id=data[-1].id if data else None)


def job_out(job: Job) -> JobOut:
    """The job's public JSON is rendered once, in `persistence.views` (webhook bodies carry it too)."""
    return JobOut.model_validate(job_document(job))


def stages_out(job: Job) -> list[StageOut]:
    """Every stage in order; the ones a job has not reached are pending (or skipped)."""
    return [StageOut.model_validate(s) for s in stage_documents(job)]


def event_out(event: JobEvent) -> JobEventOut:
    return JobEventOut(id=f"evt_{event.id}", created_at=event.created_at, type=event.type, level=event.level,
                       stage=event.stage if event.stage in Stage._value2member_map_ else None,
                       message=event.message or "", data=event.data)


def artifact_out(art: Artifact, request: Request, storage: Storage, settings: Settings) -> ArtifactOut:
    """Presigning is a local signature (no request to the backend), so every listing gets URLs."""
    url = storage.presign(art.storage_key, settings.presign_expires_s, art.name.rsplit("/", 1)[-1])
    expires = utcnow() + timedelta(seconds=settings.presign_expires_s) if url else None
    return ArtifactOut(id=art.id, job_id=art.job_id, name=art.name, bytes=art.bytes, sha256=art.sha256,
                       content_type=art.content_type, created_at=art.created_at,
                       content_url=str(request.url_for("download_job_artifact", job_id=art.job_id,
                                                       artifact_id=art.id)),
                       download_url=url, download_url_expires_at=expires)


def file_out(f: File) -> FileOut:
    return FileOut(id=f.id, filename=f.filename, purpose=f.purpose, bytes=f.bytes, sha256=f.sha256,
                   created_at=f.created_at)

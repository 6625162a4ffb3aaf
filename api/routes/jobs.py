"""/v1/jobs: create (idempotent), list, get, cancel, events, report, artifacts, download."""
from __future__ import annotations

import base64
import logging
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from svdforge.api import event_stream
from svdforge.api.deps import CeleryDep, CurrentKey, SessionDep, SettingsDep, StorageDep
from svdforge.api.json_body import JsonRoute
from svdforge.api.problems import ProblemError, field_error
from svdforge.api.routes.common import (
    After,
    Limit,
    artifact_out,
    cursor,
    event_out,
    job_out,
    list_response,
    page,
    problems,
)
from svdforge.api.schemas import ArtifactList, ArtifactOut, JobCreate, JobEventList, JobList, JobOut, JobReport
from svdforge.core import architectures
from svdforge.persistence import jobs as jobs_repo
from svdforge.persistence.logs import bind
from svdforge.persistence.modelref import ModelRefError, check_hub_name, check_model_ref, local_config
from svdforge.persistence.queue import enqueue
from svdforge.persistence.settings import Settings
from svdforge.persistence.state import TERMINAL, JobStatus, StaleTransition, transition
from svdforge.persistence.storage import StorageError
from svdforge.persistence.tables import ApiKey, Artifact, File, Job, JobEvent, utcnow

log = logging.getLogger("svdforge.api")
router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=JsonRoute)

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                              description="Retries with the same key and body return the same job.")]


def _owned_job(session: Session, job_id: str, key: ApiKey) -> Job:
    job = jobs_repo.get_owned_job(session, job_id, key.id)
    if job is None:
        raise ProblemError(404, "not_found", f"no job {job_id}")
    bind(job_id=job.id)  # the request's later log lines (its access line too) name the job
    return job


def _validate_references(body: JobCreate, session: Session, key: ApiKey, settings: Settings) -> None:
    """What pydantic cannot know: the model reference policy and the caller's uploaded files."""
    try:
        model_config = local_config(check_model_ref(body.model, settings))
    except ModelRefError as e:
        raise field_error("model", str(e)) from None
    if model_config is not None:
        _check_positions(body, model_config)
    refs = [("calibration", body.calibration), ("evaluation", body.evaluation)]
    if getattr(body.adapter, "data", None) is not None:
        refs.append(("adapter.data", body.adapter.data))
    for field, spec in refs:
        if spec.source == "hf":
            try:
                check_hub_name(spec.dataset)
            except ModelRefError as e:
                raise field_error(f"{field}.dataset", str(e)) from None
        if spec.source == "file":
            f = session.get(File, spec.file_id)
            if f is None or f.owner_id != key.id:
                raise field_error(f"{field}.file_id", f"no uploaded file {spec.file_id}")


def _check_positions(body: JobCreate, model_config: dict) -> None:
    """Every window the job would feed the model fits its positions (a local model's config is
    read at submission; any other model is checked by the worker when the job starts)."""
    lengths = {"calibration.seq_len": body.calibration.seq_len}
    if getattr(body.adapter, "data", None) is not None:
        lengths["adapter.data.seq_len"] = body.adapter.data.seq_len
    if body.evaluation.enabled:
        lengths["evaluation.seq_len"] = body.evaluation.seq_len
    for field, seq_len in lengths.items():
        why = architectures.too_long(seq_len, model_config)
        if why is not None:
            raise field_error(field, why)


def _enqueue(celery, session: Session, job: Job) -> None:
    """Send the job id (its row is committed); if the queue is down the job waits, it is not lost."""
    bind(job_id=job.id)
    try:
        enqueue(celery, job.id)
    except Exception as e:  # noqa: BLE001 - any broker failure: the recovery sweep will enqueue it
        log.warning("job %s accepted but not queued yet: %s", job.id, e)
        return
    job.enqueued_at = utcnow()
    session.commit()


def _created(job: Job, request: Request, response: Response, replayed: bool = False) -> JobOut:
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id))
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


def _replay(existing: Job, payload: dict, celery, session: Session, request: Request,
            response: Response) -> JobOut:
    bind(job_id=existing.id)
    if existing.request_hash != jobs_repo.request_hash(payload):
        raise ProblemError(422, "idempotency_key_reused",
                           "this Idempotency-Key was used with a different request body", job_id=existing.id)
    if existing.status == JobStatus.QUEUED and existing.enqueued_at is None:
        _enqueue(celery, session, existing)
    return _created(existing, request, response, replayed=True)


@router.post("", status_code=201, operation_id="create_job", response_model=JobOut,
             responses={201: {"headers": {"Location": {"description": "URL of the job.",
                                                       "schema": {"type": "string"}}}},
                        **problems(400, 401, 413, 415, 422)},
             summary="Create a compression job",
             description="Answers 201 with the job and a Location header. With an `Idempotency-Key`, a retry "
                         "with the same body returns the same job; the same key with another body is a 422.")
def create_job(body: JobCreate, request: Request, response: Response, session: SessionDep, key: CurrentKey,
               settings: SettingsDep, celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> JobOut:
    # the unused ones of ratio / ratios / target are left out: a single-ratio request stores (and hashes) as
    # before sweeps and targets
    payload = body.model_dump(mode="json", exclude={k for k in ("ratio", "ratios", "target")
                                                    if getattr(body, k) is None})
    if idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.owner_id == key.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            return _replay(existing, payload, celery, session, request, response)
    _validate_references(body, session, key, settings)
    job = jobs_repo.create_job(session, key.id, payload, idempotency_key=idempotency_key)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won
        session.rollback()
        existing = session.scalar(select(Job).where(Job.owner_id == key.id, Job.idempotency_key == idempotency_key))
        if idempotency_key is None or existing is None:
            raise
        return _replay(existing, payload, celery, session, request, response)
    bind(job_id=job.id)
    log.info("job created: %s", job.model)
    _enqueue(celery, session, job)
    return _created(job, request, response)


@router.get("", operation_id="list_jobs", response_model=JobList, responses=problems(401, 422),
            summary="List your jobs, newest first")
def list_jobs(session: SessionDep, key: CurrentKey, after: After = None, limit: Limit = 20,
              status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None) -> JobList:
    q = select(Job).where(Job.owner_id == key.id)
    if status is not None:
        q = q.where(Job.status == status.value)
    if cursor(after, "job"):
        q = q.where(Job.id < after)
    rows, more = page(list(session.scalars(q.order_by(Job.id.desc()).limit(limit + 1))), limit)
    data = [job_out(j) for j in rows]
    return list_response(JobList, data, more)


@router.get("/{job_id}", operation_id="get_job", response_model=JobOut, responses=problems(401, 404, 422),
            summary="Get a job: status, stage, progress, per-stage timings, error")
def get_job(job_id: str, session: SessionDep, key: CurrentKey) -> JobOut:
    return job_out(_owned_job(session, job_id, key))


@router.post("/{job_id}/cancel", operation_id="cancel_job", response_model=JobOut,
             responses=problems(401, 404, 409, 422), summary="Cancel a job",
             description="A queued job is cancelled at once; a running one becomes `cancelling` and stops at the "
                         "next stage or layer boundary, leaving no artifacts. Cancelling twice is harmless; "
                         "a finished job answers 409.")
def cancel_job(job_id: str, session: SessionDep, key: CurrentKey) -> JobOut:
    job = _owned_job(session, job_id, key)
    for _ in range(5):
        if job.status in TERMINAL:
            raise ProblemError(409, "job_finished", f"job {job_id} is already {job.status}", status_now=job.status)
        if job.status == JobStatus.CANCELLING:
            return job_out(job)
        target = JobStatus.CANCELLED if job.status == JobStatus.QUEUED else JobStatus.CANCELLING
        try:
            transition(session, job, target, message="cancel requested")
            session.commit()
            log.info("cancel requested: %s", target.value)
            return job_out(job)
        except StaleTransition:  # the worker moved it meanwhile: look again
            session.rollback()
            session.refresh(job)
    raise ProblemError(409, "conflict", f"job {job_id} kept changing; try again")


LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=64, description=(
    "With `Accept: text/event-stream`: resume after this event id (what an EventSource sends when it "
    "reconnects); it takes precedence over `after`."))]


@router.get("/{job_id}/events", operation_id="list_job_events", response_model=JobEventList,
            responses={200: {"content": event_stream.OPENAPI_CONTENT,
                             "description": "The events as JSON, or as Server-Sent Events when asked for"},
                       **problems(401, 404, 422)},
            summary="List a job's events, oldest first, or follow them live (Server-Sent Events)",
            description="An append-only log: status changes, stage started/finished, progress, metrics, errors. "
                        "Follow a job by passing the last id you saw as `after`. "
                        + event_stream.OPENAPI_DESCRIPTION)
def list_job_events(job_id: str, request: Request, session: SessionDep, key: CurrentKey, settings: SettingsDep,
                    after: After = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    last_event_id: LastEventId = None) -> JobEventList | Response:
    _owned_job(session, job_id, key)
    if event_stream.wants_event_stream(request.headers.get("accept")):
        start = 0
        if last_event_id and last_event_id.strip():
            start = event_stream.parse_event_id(last_event_id, "Last-Event-ID")
        elif after:
            start = event_stream.parse_event_id(after, "after")
        session.close()  # the stream reads in short sessions of its own
        return event_stream.event_stream(request.app.state.event_poller, settings, job_id, start)
    q = select(JobEvent).where(JobEvent.job_id == job_id)
    if after:
        m = re.fullmatch(r"evt_(\d{1,18})", after)
        if not m:
            raise field_error("after", "must be an event id like evt_42")
        q = q.where(JobEvent.id > int(m.group(1)))
    rows, more = page(list(session.scalars(q.order_by(JobEvent.id).limit(limit + 1))), limit)
    data = [event_out(e) for e in rows]
    return list_response(JobEventList, data, more)


@router.get("/{job_id}/report", operation_id="get_job_report", response_model=JobReport,
            responses=problems(401, 404, 409, 422), summary="Get the metrics report of a succeeded job")
def get_job_report(job_id: str, session: SessionDep, key: CurrentKey) -> JobReport:
    job = _owned_job(session, job_id, key)
    if job.status != JobStatus.SUCCEEDED or job.report is None:
        raise ProblemError(409, "report_not_ready", f"job {job_id} is {job.status}; a report exists once it "
                           "has succeeded", status_now=job.status)
    report = {k: v for k, v in job.report.items() if k not in ("object", "job_id")}
    return JobReport(job_id=job.id, **report)


def _owned_artifact(session: Session, job_id: str, artifact_id: str, key: ApiKey) -> Artifact:
    _owned_job(session, job_id, key)
    art = session.get(Artifact, artifact_id)
    if art is None or art.job_id != job_id:
        raise ProblemError(404, "not_found", f"no artifact {artifact_id} in job {job_id}")
    return art


@router.get("/{job_id}/artifacts", operation_id="list_job_artifacts", response_model=ArtifactList,
            responses=problems(401, 404, 422), summary="List a job's artifact files")
def list_job_artifacts(job_id: str, request: Request, session: SessionDep, key: CurrentKey, storage: StorageDep,
                       settings: SettingsDep, after: After = None, limit: Limit = 100) -> ArtifactList:
    _owned_job(session, job_id, key)
    q = select(Artifact).where(Artifact.job_id == job_id)
    if cursor(after, "art"):
        q = q.where(Artifact.id > after)
    rows, more = page(list(session.scalars(q.order_by(Artifact.id).limit(limit + 1))), limit)
    data = [artifact_out(a, request, storage, settings) for a in rows]
    return list_response(ArtifactList, data, more)


@router.get("/{job_id}/artifacts/{artifact_id}", operation_id="get_job_artifact", response_model=ArtifactOut,
            responses=problems(401, 404, 422), summary="Get one artifact file's metadata (sha256, download URLs)")
def get_job_artifact(job_id: str, artifact_id: str, request: Request, session: SessionDep, key: CurrentKey,
                     storage: StorageDep, settings: SettingsDep) -> ArtifactOut:
    return artifact_out(_owned_artifact(session, job_id, artifact_id, key), request, storage, settings)


_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_DOWNLOAD_HEADERS = {
    "ETag": {"description": "The sha256 of the whole file, quoted.", "schema": {"type": "string"}},
    "X-Content-SHA256": {"description": "Hex sha256 of the whole file.", "schema": {"type": "string"}},
    "Repr-Digest": {"description": "RFC 9530 digest of the whole file.", "schema": {"type": "string"}},
    "Accept-Ranges": {"schema": {"type": "string"}},
}


@router.get("/{job_id}/artifacts/{artifact_id}/content", operation_id="download_job_artifact",
            response_class=StreamingResponse, summary="Download an artifact file (Range supported)",
            responses={200: {"content": _BINARY, "description": "The whole file", "headers": _DOWNLOAD_HEADERS},
                       206: {"content": _BINARY, "description": "The requested byte range",
                             "headers": {**_DOWNLOAD_HEADERS, "Content-Range": {"schema": {"type": "string"}}}},
                       304: {"description": "Not modified (If-None-Match matched the ETag)"},
                       **problems(401, 404, 416, 422, 503)})
def download_job_artifact(job_id: str, artifact_id: str, session: SessionDep, key: CurrentKey, storage: StorageDep,
                          range_: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
                          if_range: Annotated[str | None, Header(alias="If-Range", max_length=200)] = None,
                          if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=200)] = None,
                          ) -> Response:
    art = _owned_artifact(session, job_id, artifact_id, key)
    session.close()  # no database work while the bytes stream
    etag = f'"{art.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "X-Content-SHA256": art.sha256,
               "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(art.sha256)).decode()}:",
               "Content-Disposition": f'attachment; filename="{art.name.rsplit("/", 1)[-1]}"'}
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    span = None
    if range_ is not None and (if_range is None or if_range.strip() == etag):
        span = parse_range(range_, art.bytes)
    start, end, status = 0, art.bytes - 1, 200
    if span is not None:
        start, end, status = span[0], span[1], 206
        headers["Content-Range"] = f"bytes {start}-{end}/{art.bytes}"
    headers["Content-Length"] = str(max(end - start + 1, 0))
    try:
        stream = storage.open_range(art.storage_key, start, end) if art.bytes else iter([b""])
    except StorageError as e:
        log.error("artifact %s: %s", art.id, e)
        raise ProblemError(503, "storage_unavailable", "the artifact store could not serve this file") from None
    return StreamingResponse(stream, status_code=status, headers=headers, media_type="application/octet-stream")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=` range as (start, end) inclusive; None means serve the whole file.

    Several ranges or a syntax we do not read are ignored (RFC 9110 lets a server do
    that); a well-formed range that starts past the end is a 416.
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - n, 0), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None  # invalid range: ignored
    if start >= size:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> ProblemError:
    return ProblemError(416, "range_not_satisfiable", f"the file has {size} bytes",
                        headers={"Content-Range": f"bytes */{size}"})

"""Run one job: claim it, call `svdforge.core.pipeline.compress`, upload, finish. No Celery here.

The Celery task (worker.tasks) is a thin shell around `JobRunner.run`, so this logic is
tested directly and runs the same under Redis and the embedded filesystem queue.

Order of the final steps matters: artifacts are uploaded first, then one transaction
adds their rows, stores the report and moves the job to `succeeded`. That transition is
a compare-and-set on `running`: if a cancel arrived meanwhile, the uploads are deleted
and the job ends `cancelled` instead. Whatever happens, the local scratch folder goes.

Crash safety (README "Crash safety"): the claim is one conditional UPDATE (queued ->
running, attempt + 1, lease), the monitor thread renews the lease as long as the row still
names this worker and attempt, and every write that ends the job re-checks that. Once the
artifact is saved (after load, whiten, svd and recover) its files go to storage under the
attempt's prefix and `jobs.checkpoint` points at them; an attempt that finds a checkpoint
downloads it and runs only evaluate and upload. Storage layout: `artifacts/<job>/<attempt>/`;
a job that succeeds keeps only its last attempt's folder, a job that fails or is cancelled
keeps nothing.
"""
from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import logging
import math
import mimetypes
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from svdforge.core.config import SweepConfig, TargetedConfig
from svdforge.core.errors import Cancelled, NumericalError, TargetUnmet, UserError
from svdforge.persistence.db import Database
from svdforge.persistence.ids import new_id
from svdforge.persistence.jobs import add_event, artifact_prefix
from svdforge.persistence.logs import bind, log_context
from svdforge.persistence.settings import Settings
from svdforge.persistence.state import ACTIVE, JobError, JobStatus, Stage, StaleTransition, transition
from svdforge.persistence.storage import Storage, StorageError
from svdforge.persistence.tables import Artifact, File, Job, JobEvent, utcnow
from svdforge.worker.config import build_config
from svdforge.worker.figures import link_figures, render_job_figures

log = logging.getLogger("svdforge.worker")

CompressFn = Callable[..., dict]
# core's stage names -> the job's stages (`persistence.state.Stage`). Each job stage covers:
#   load      core's `load`: the model and tokenizer read (from the hub, a folder or a .gguf file)
#   whiten    core's `whiten`: calibration forwards and statistics (Fisher and global-allocation
#             spectra too)
#   svd       core's `svd`: each linear's decomposition and truncation
#   recover   core's `recover`: the recovery adapter (update, LoRA or AdaLoRA)
#   evaluate  core's `evaluate`: perplexity, fidelity, throughput
#   upload    core's `save` (writing the artifact folder) and the worker's own `upload` (storing it)
STAGE_OF = {"load": Stage.LOAD, "whiten": Stage.WHITEN, "svd": Stage.SVD, "recover": Stage.RECOVER,
            "evaluate": Stage.EVALUATE, "save": Stage.UPLOAD, "upload": Stage.UPLOAD}


def default_compress(config: Any, *args: Any, **kwargs: Any) -> dict:
    from svdforge.core.pipeline import compress  # torch is imported only where a job runs
    from svdforge.core.sweeps import sweep
    from svdforge.core.targets import compress_to_target

    if isinstance(config, SweepConfig):  # figures: drawn below with the job's other figures
        return sweep(config.config, config.ratios, *args, figures=False, **kwargs)
    if isinstance(config, TargetedConfig):
        return compress_to_target(config.config, config.target, *args, **kwargs)
    return compress(config, *args, **kwargs)


def _jsonable(value: Any) -> Any:
    """What a JSON column and strict JSON can hold: NaN/inf become null, the exotic a string."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:
        f = float(value)  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


class JobMonitor:
    """Collects the pipeline's events and writes them from a background thread.

    The compute thread only appends to a buffer; every `interval` seconds the monitor
    writes the buffered events, the current stage/progress/per-stage timings, renews the
    job's lease and reads back its status, all in one short transaction. So progress is
    throttled to one write per interval, the lease stays fresh during long silent stages,
    and `should_cancel()` is a memory read that the layer loop can call freely.
    """

    def __init__(self, db: Database, job_id: str, settings: Settings, attempt: int,
                 stopping: threading.Event | None = None, worker_id: str | None = None) -> None:
        self.db, self.job_id, self.settings, self.attempt = db, job_id, settings, attempt
        self.worker_id = worker_id
        self._stopping = stopping or threading.Event()
        self.interval = settings.progress_interval_s
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._stages: dict[str, dict[str, Any]] = {}
        self._stage: str | None = None
        self._progress = 0.0
        self._dirty = False
        self._last_progress_event = 0.0
        self._started: dict[str, float] = {}
        self._cancel = threading.Event()
        self.lease_lost = False  # the lease could not be renewed in time: stop before another worker may start
        self._renewed_at = time.monotonic()  # the claim set the first lease
        self._stop = threading.Event()
        # run in a copy of the creator's context: its log lines carry the job's id (persistence.logs)
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,),
                                        name=f"monitor-{job_id}", daemon=True)

    # --- called by the pipeline (compute thread) ---------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type", "log"))
        stage = STAGE_OF.get(event.get("stage") or "")
        stage_name = stage.value if stage else None
        now = utcnow()
        with self._lock:
            if kind == "stage_started" and stage_name:
                self._start_stage(stage_name, now)
            elif kind == "stage_finished" and stage_name:
                self._finish_stage(stage_name, now, event.get("seconds"))
            elif kind == "progress" and stage_name:
                self._stage, self._progress = stage_name, float(event.get("fraction") or 0.0)
                self._stages.setdefault(stage_name, {"status": "running"})["progress"] = self._progress
                self._dirty = True
                if time.monotonic() - self._last_progress_event < self.interval and self._progress < 1.0:
                    return  # coalesced: the job row still shows the latest fraction
                self._last_progress_event = time.monotonic()
            data = {k: v for k, v in event.items() if k not in ("type", "stage", "message")}
            message = str(event.get("message") or "")
            if event.get("stage") == "save" and not message:
                message = "writing the artifact"
            self._events.append({"type": kind, "stage": stage_name, "message": message,
                                 "level": str(event.get("level", "info")), "data": _jsonable(data) or None,
                                 "created_at": now})
            self._dirty = True

    def should_cancel(self) -> bool:
        """True when the job was cancelled or taken away, or when the worker is shutting down."""
        return self._cancel.is_set() or self._stopping.is_set()

    @property
    def current_stage(self) -> str | None:
        return self._stage

    def stages_snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return json.loads(json.dumps(self._stages))

    def seed_stages(self, stages: dict[str, dict[str, Any]]) -> None:
        """Stages a previous attempt finished (a resumed job shows them as completed)."""
        with self._lock:
            for name, info in (stages or {}).items():
                if info.get("status") == "completed":
                    self._stages[name] = dict(info)
            self._dirty = True

    def _start_stage(self, name: str, now) -> None:
        info = self._stages.setdefault(name, {"status": "running", "started_at": now.isoformat(), "seconds": 0.0})
        info.setdefault("started_at", now.isoformat())
        info.setdefault("seconds", 0.0)
        info["status"], info["finished_at"] = "running", None
        self._started[name] = time.monotonic()
        self._stage, self._progress = name, 0.0

    def _finish_stage(self, name: str, now, seconds: Any) -> None:
        info = self._stages.setdefault(name, {"started_at": now.isoformat(), "seconds": 0.0})
        began = self._started.pop(name, None)
        if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0:
            elapsed = float(seconds)  # core timed the stage itself (its stages overlap: trust it)
        else:
            elapsed = time.monotonic() - began if began is not None else 0.0
        info["seconds"] = float(info.get("seconds") or 0.0) + elapsed
        info.update(status="completed", finished_at=now.isoformat(), progress=1.0)
        if self._stage == name:
            self._progress = 1.0

    # --- the monitor thread ---------------------------------------------------------
    def start(self) -> JobMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
                self._renewed_at = time.monotonic()
            except Exception:  # a failed heartbeat is retried next tick
                log.exception("job %s: progress write failed", self.job_id)
                silent = time.monotonic() - self._renewed_at
                if silent > 0.8 * self.settings.lease_s and not self.lease_lost:
                    # Fencing: the lease is about to run out and a reaper may hand the job to
                    # another worker. Stop computing now rather than run beside it.
                    log.error("job %s: lease not renewed for %.0f s: stopping the job", self.job_id, silent)
                    self.lease_lost = True
                    self._cancel.set()

    def flush(self, session=None) -> None:
        """Write buffered state; inside `session` (no commit) or in a transaction of its own."""
        with self._lock:
            events, self._events = self._events, []
            values = {"stage": self._stage, "progress": self._progress,
                      "stages": json.loads(json.dumps(self._stages))}
            dirty, self._dirty = self._dirty, False
        if session is not None:
            self._write(session, events, values, dirty)
            return
        try:
            with self.db.begin() as s:
                self._write(s, events, values, dirty)
        except Exception:
            with self._lock:  # keep what was not written for the next try
                self._events[:0] = events
                self._dirty = self._dirty or dirty
            raise

    def _write(self, session, events: list[dict], values: dict, dirty: bool) -> None:
        """Renew the lease (and write progress) if the job is still this attempt's, then log.

        The heartbeat: a conditional UPDATE on (attempt, worker, active status), so a worker
        whose job was requeued by a reaper and taken by another cannot renew it; it sees
        that here and stops (`should_cancel`), and writes nothing more."""
        now = utcnow()
        values = values if dirty else {}
        mine = [Job.id == self.job_id, Job.attempt == self.attempt, Job.status.in_([s.value for s in ACTIVE])]
        if self.worker_id is not None:
            mine.append(Job.worker_id == self.worker_id)
        session.execute(update(Job).where(*mine)
                        .values(updated_at=now, lease_expires_at=now + timedelta(seconds=self.settings.lease_s),
                                **values), execution_options={"synchronize_session": False})
        row = session.execute(select(Job.status, Job.attempt, Job.worker_id).where(Job.id == self.job_id)).one()
        if row.attempt != self.attempt or row.status not in {s.value for s in ACTIVE} or (
                self.worker_id is not None and row.worker_id != self.worker_id):
            self._cancel.set()  # no longer ours (requeued or ended): stop, and write nothing more
            return
        if row.status != JobStatus.RUNNING.value:
            self._cancel.set()  # a cancel was requested: stop at the next boundary
        session.add_all(JobEvent(job_id=self.job_id, **e) for e in events)


@dataclass
class Uploaded:
    name: str
    key: str
    bytes: int
    sha256: str
    content_type: str
    id: str = field(default_factory=lambda: new_id("art"))  # the Artifact row's id (the report links figures)


class JobRunner:
    def __init__(self, db: Database, storage: Storage, settings: Settings,
                 compress: CompressFn = default_compress, worker_id: str | None = None) -> None:
        self.db, self.storage, self.settings, self.compress = db, storage, settings, compress
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        # Set when the worker shuts down: the running job stops at its next boundary and goes
        # back to the queue (the next worker's start-up sweep sends it again).
        self.stopping = threading.Event()

    def run(self, job_id: str) -> str:
        """Run the job if it is ours to run; return its final status (or `skipped`).

        Every log line meanwhile, in this thread or the monitor's, carries `job_id` (and
        `attempt` once claimed)."""
        with log_context(job_id=job_id):
            status = self._run(job_id)
            log.info("job %s", status, extra={"status": status})
            return status

    def _run(self, job_id: str) -> str:
        claimed = self._claim(job_id)
        if claimed is None:
            return "skipped"
        request, attempt, checkpoint = claimed
        bind(attempt=attempt)
        log.info("job running on %s (attempt %s)", self.worker_id, attempt)
        work = self.settings.work_dir / job_id
        shutil.rmtree(work, ignore_errors=True)
        out_dir = work / "out"
        monitor = JobMonitor(self.db, job_id, self.settings, attempt, self.stopping, self.worker_id).start()
        uploaded: list[Uploaded] = []
        saved: dict[str, dict[str, Any]] = {}  # files this attempt already stored (its checkpoint)
        try:
            config = build_config(request, self._inputs(job_id, request, work / "inputs"), self.settings)
            hooks: dict[str, Any] = {}
            # a retried sweep or targeted job starts over
            if self.settings.checkpoints and not isinstance(config, (SweepConfig, TargetedConfig)):
                resume = self._restore(checkpoint, out_dir, monitor)
                hooks = {"resume": resume} if resume is not None else \
                    {"on_saved": functools.partial(self._save_checkpoint, job_id, monitor, saved)}
            report = self.compress(config, out_dir, progress=monitor, should_cancel=monitor.should_cancel, **hooks)
            figures, figures_error = render_job_figures(report or {}, out_dir)
            uploaded = self._upload(job_id, out_dir, monitor, saved)
            report = link_figures(report, job_id, figures, figures_error, uploaded)
            return self._finish(job_id, monitor, uploaded, _jsonable(report))
        except Cancelled:
            return self._end(job_id, monitor, JobStatus.CANCELLED, None)
        except TargetUnmet as e:  # a UserError: caught first, so that the code says what happened
            return self._fail(job_id, monitor, "target_unmet", str(e))
        except UserError as e:
            return self._fail(job_id, monitor, "invalid_input", str(e))
        except NumericalError as e:
            return self._fail(job_id, monitor, "numerical_error", str(e))
        except StorageError as e:
            log.exception("job %s: storage failed", job_id)
            return self._fail(job_id, monitor, "storage_error", str(e))
        except Exception as e:  # any other failure is ours: keep the message, log the trace
            log.exception("job %s failed", job_id)
            return self._fail(job_id, monitor, "internal_error", f"{type(e).__name__}: {e}")
        finally:
            monitor.stop()
            shutil.rmtree(work, ignore_errors=True)

    # --- steps -----------------------------------------------------------------------
    def _claim(self, job_id: str) -> tuple[dict[str, Any], int, dict[str, Any] | None] | None:
        """Move the job to running if it is queued (or its previous worker's lease ran out).

        The move is one conditional UPDATE (status and attempt as read): of two workers that
        got the same job's message, one runs it and the other gets `skipped`."""
        with self.db.begin() as s:
            job = s.get(Job, job_id)
            if job is None:
                log.warning("job %s: no such job, message dropped", job_id)
                return None
            try:
                now = utcnow()
                if job.status == JobStatus.RUNNING and job.lease_expires_at and job.lease_expires_at <= now:
                    if job.attempt >= self.settings.max_attempts:
                        transition(s, job, JobStatus.FAILED, lease_expired_by=now, error=JobError(
                            "worker_lost", f"the worker running this job was lost {job.attempt} times "
                            f"(max_attempts {self.settings.max_attempts}); the job is not retried again", job.stage))
                        s.commit()
                        self.delete_artifacts(job_id)
                        return None
                    transition(s, job, JobStatus.QUEUED, lease_expired_by=now,
                               message=f"requeued: the worker of attempt {job.attempt} was lost ({job.worker_id})")
                if job.status != JobStatus.QUEUED:
                    log.info("job %s is %s: nothing to run", job_id, job.status)
                    return None
                transition(s, job, JobStatus.RUNNING, worker_id=self.worker_id, lease_s=self.settings.lease_s,
                           message=f"running on {self.worker_id} (attempt {job.attempt + 1})")
            except StaleTransition:
                log.info("job %s: another worker took it first", job_id)
                s.rollback()
                return None
            return dict(job.request), job.attempt, job.checkpoint

    def _restore(self, checkpoint: dict[str, Any] | None, out_dir: Path,
                 monitor: JobMonitor) -> dict[str, Any] | None:
        """Download a previous attempt's checkpoint into out_dir; its report, or None to start over."""
        if not checkpoint or not checkpoint.get("files") or not checkpoint.get("report"):
            return None
        files: dict[str, dict[str, Any]] = checkpoint["files"]
        try:
            for name, meta in sorted(files.items()):
                if monitor.should_cancel():
                    raise Cancelled("cancelled while restoring the checkpoint")
                dest = (out_dir / name).resolve()
                if not dest.is_relative_to(out_dir.resolve()):
                    raise StorageError(f"checkpoint file name {name!r} leaves the output folder")
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.storage.download_to(meta["key"], dest)
                if _sha256(dest) != meta["sha256"]:
                    raise StorageError(f"{name}: sha256 differs from the checkpoint")
        except StorageError as e:
            log.warning("job %s: checkpoint of attempt %s unusable: %s", monitor.job_id, checkpoint.get("attempt"), e)
            monitor({"type": "log", "level": "warning",
                     "message": f"checkpoint of attempt {checkpoint.get('attempt')} unusable ({e}): starting over"})
            shutil.rmtree(out_dir, ignore_errors=True)
            return None
        monitor.seed_stages(checkpoint.get("stages") or {})
        monitor({"type": "log", "message": f"resumed from the checkpoint of attempt {checkpoint.get('attempt')}: "
                 f"whiten, svd, recover and save are not run again ({len(files)} files restored)",
                 "checkpoint_attempt": checkpoint.get("attempt")})
        return checkpoint["report"]

    def _save_checkpoint(self, job_id: str, monitor: JobMonitor, saved: dict[str, dict[str, Any]],
                         out_dir: Path, report: dict[str, Any]) -> None:
        """`compress`'s on_saved: store the saved artifact under this attempt's prefix and point
        `jobs.checkpoint` at it (only while the job is still this worker's attempt)."""
        files = sorted(p for p in Path(out_dir).rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files) or 1
        done = 0
        prefix = artifact_prefix(job_id, monitor.attempt)
        monitor({"type": "stage_started", "stage": "upload", "message": f"checkpoint: {len(files)} files"})
        for p in files:
            if monitor.should_cancel():
                raise Cancelled("cancelled while uploading the checkpoint")
            name = p.relative_to(out_dir).as_posix()
            size, digest = p.stat().st_size, _sha256(p)
            self.storage.put_file(f"{prefix}/{name}", p, content_type=_content_type(name))
            saved[name] = {"key": f"{prefix}/{name}", "sha256": digest, "bytes": size}
            done += size
            monitor({"type": "progress", "stage": "upload", "fraction": done / total, "message": f"checkpoint {name}"})
        monitor({"type": "stage_finished", "stage": "upload",
                 "message": f"checkpoint: {len(saved)} files, {done} bytes"})
        record = {"attempt": monitor.attempt, "files": saved, "report": _jsonable(report),
                  "stages": monitor.stages_snapshot(), "created_at": utcnow().isoformat()}
        with self.db.begin() as s:
            n = s.execute(update(Job).where(Job.id == job_id, Job.attempt == monitor.attempt,
                                            Job.worker_id == self.worker_id, Job.status == JobStatus.RUNNING.value)
                          .values(checkpoint=record), execution_options={"synchronize_session": False}).rowcount
            if n != 1:
                raise Cancelled("the job is no longer this attempt's: checkpoint not recorded")
            add_event(s, job_id, "log", stage=Stage.UPLOAD.value,
                      message=f"checkpoint saved ({len(saved)} files, {done} bytes): a retry resumes at evaluate",
                      data={"checkpoint": {"attempt": monitor.attempt, "files": len(saved), "bytes": done}})

    def _inputs(self, job_id: str, request: dict[str, Any], folder: Path) -> dict[str, Path]:
        """Copy the uploaded files the request names into the scratch folder."""
        file_ids = {d["file_id"] for d in _data_specs(request) if d.get("source") == "file"}
        paths: dict[str, Path] = {}
        if not file_ids:
            return paths
        folder.mkdir(parents=True, exist_ok=True)
        with self.db.begin(write=False) as s:
            owner = s.scalar(select(Job.owner_id).where(Job.id == job_id))
            files = {f.id: f for f in s.scalars(select(File).where(File.id.in_(file_ids), File.owner_id == owner))}
        for file_id in sorted(file_ids):
            if file_id not in files:
                raise UserError(f"file {file_id} no longer exists")
            paths[file_id] = folder / f"{file_id}.txt"
            self.storage.download_to(files[file_id].storage_key, paths[file_id])
        return paths

    def _upload(self, job_id: str, out_dir: Path, monitor: JobMonitor,
                saved: dict[str, dict[str, Any]] | None = None) -> list[Uploaded]:
        """Store every file under this attempt's prefix; files its checkpoint already stored
        (same name and sha256) are not sent again. A failure leaves the cleanup to `_end`."""
        files = sorted(p for p in out_dir.rglob("*") if p.is_file())
        expected = _manifest_hashes(out_dir)
        total = sum(p.stat().st_size for p in files) or 1
        done = 0
        monitor({"type": "stage_started", "stage": "upload", "message": f"{len(files)} files"})
        uploaded: list[Uploaded] = []
        prefix = artifact_prefix(job_id, monitor.attempt)
        for p in files:
            if monitor.should_cancel():
                raise Cancelled("cancelled during upload")
            name = p.relative_to(out_dir).as_posix()
            size, digest = p.stat().st_size, _sha256(p)
            if name in expected and expected[name] != digest:
                raise RuntimeError(f"{name}: sha256 differs from the artifact manifest")
            ctype, key = _content_type(name), f"{prefix}/{name}"
            prior = (saved or {}).get(name)
            if not (prior and prior["key"] == key and prior["sha256"] == digest):
                self.storage.put_file(key, p, content_type=ctype, move=True)
            uploaded.append(Uploaded(name, key, size, digest, ctype))
            done += size
            monitor({"type": "progress", "stage": "upload", "fraction": done / total, "message": name})
        monitor({"type": "stage_finished", "stage": "upload",
                 "message": f"{len(uploaded)} files, {done} bytes"})
        return uploaded

    def _finish(self, job_id: str, monitor: JobMonitor, uploaded: list[Uploaded], report: dict | None) -> str:
        monitor.stop()
        with self.db.begin() as s:
            job = s.get(Job, job_id)
            if not self._still_ours(job, monitor):
                return self._stand_down(job, monitor)
            monitor.flush(s)
            s.refresh(job)  # the flush wrote stages and progress behind the ORM's back
            succeeded = job.status == JobStatus.RUNNING
            if succeeded:
                for u in uploaded:
                    s.add(Artifact(id=u.id, job_id=job_id, name=u.name, bytes=u.bytes, sha256=u.sha256,
                                   content_type=u.content_type, storage_key=u.key))
                job.report = report
                transition(s, job, JobStatus.SUCCEEDED, message=f"succeeded: {len(uploaded)} artifacts")
        if succeeded:
            for attempt in range(1, monitor.attempt):  # what lost attempts left (their checkpoint too)
                self.delete_artifacts(job_id, attempt)
            return JobStatus.SUCCEEDED.value
        # a cancel arrived while uploading: the artifacts go, the job ends cancelled
        return self._end(job_id, monitor, JobStatus.CANCELLED, None)

    def _fail(self, job_id: str, monitor: JobMonitor, code: str, message: str) -> str:
        return self._end(job_id, monitor, JobStatus.FAILED, JobError(code, message, monitor.current_stage))

    def _end(self, job_id: str, monitor: JobMonitor, to: JobStatus, error: JobError | None) -> str:
        """Fail, cancel or (when the worker is shutting down) requeue; then remove what the job
        no longer needs from storage: everything once it has ended, this attempt's files on a
        requeue unless they are the checkpoint the next attempt resumes from."""
        monitor.stop()
        for _ in range(5):
            with self.db.begin() as s:
                job = s.get(Job, job_id)
                if not self._still_ours(job, monitor):
                    return self._stand_down(job, monitor)  # requeued or ended elsewhere (e.g. by a reaper)
                monitor.flush(s)
                s.refresh(job)
                target = to
                if to is JobStatus.CANCELLED and job.status == JobStatus.RUNNING:
                    lost = monitor.lease_lost and job.attempt >= self.settings.max_attempts
                    if (self.stopping.is_set() or monitor.lease_lost) and not lost:  # run it again later
                        keep = (job.checkpoint or {}).get("attempt") == monitor.attempt
                        why = "the worker shut down" if self.stopping.is_set() else "its lease could not be renewed"
                        transition(s, job, JobStatus.QUEUED, message=f"requeued: {why}")
                        s.commit()
                        if not keep:
                            self.delete_artifacts(job_id, monitor.attempt)
                        return JobStatus.QUEUED.value
                    target = JobStatus.FAILED  # Cancelled without a cancel request: an internal error
                    error = JobError("worker_lost", f"the worker running this job lost its lease {job.attempt} "
                                     f"times (max_attempts {self.settings.max_attempts})", monitor.current_stage) \
                        if lost else JobError("internal_error", "the pipeline stopped without a cancel request",
                                              monitor.current_stage)
                if error is not None:
                    add_event(s, job_id, "error", stage=error.stage, level="error",
                              message=error.message, data={"code": error.code})
                try:
                    transition(s, job, target, error=error)
                except StaleTransition:
                    s.rollback()
                    continue
            self.delete_artifacts(job_id)  # committed: the job has ended, none of its files are needed
            return target.value
        raise RuntimeError(f"job {job_id}: could not record its end")

    def _still_ours(self, job: Job, monitor: JobMonitor) -> bool:
        """False once a reaper requeued or ended the job: a stale worker must not touch it."""
        return (job.status in (JobStatus.RUNNING, JobStatus.CANCELLING) and job.attempt == monitor.attempt
                and job.worker_id == self.worker_id)

    def _stand_down(self, job: Job, monitor: JobMonitor) -> str:
        """The job is no longer this attempt's: remove this attempt's files, unless a later
        attempt is resuming from them (they are its checkpoint), and touch nothing else."""
        if (job.checkpoint or {}).get("attempt") != monitor.attempt:
            self.delete_artifacts(job.id, monitor.attempt)
        return job.status

    def delete_artifacts(self, job_id: str, attempt: int | None = None) -> None:
        """Remove one attempt's uploads (or, without `attempt`, everything of the job)."""
        try:
            self.storage.delete_prefix(artifact_prefix(job_id, attempt))
        except StorageError:
            log.exception("job %s: could not delete partial artifacts", job_id)


def _data_specs(request: dict[str, Any]) -> list[dict[str, Any]]:
    specs = [request.get("calibration") or {}, request.get("evaluation") or {}]
    adapter = request.get("adapter") or {}
    if adapter.get("data"):
        specs.append(adapter["data"])
    return specs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _manifest_hashes(out_dir: Path) -> dict[str, str]:
    """sha256 by artifact name from the manifest (and a sweep's per-ratio manifests, one level down)."""
    out: dict[str, str] = {}
    for manifest in [out_dir / "svdforge.json", *sorted(out_dir.glob("*/svdforge.json"))]:
        prefix = manifest.parent.relative_to(out_dir).as_posix()
        try:
            files = json.loads(manifest.read_text()).get("files", {})
            out.update({name if prefix == "." else f"{prefix}/{name}": meta["sha256"]
                        for name, meta in files.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def _content_type(name: str) -> str:
    if name.endswith(".json"):
        return "application/json"
    if name.endswith(".safetensors"):
        return "application/octet-stream"
    if name.endswith(".md"):  # samples.md; not in every system's mime.types (python:3.11-slim has none)
        return "text/markdown; charset=utf-8"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"

"""`svdforge serve`: the API and one worker on this machine, with nothing else to run.

SQLite in the data folder, the local artifact store, and kombu's filesystem queue: the
same Celery task as production, with the worker in a child process (`celery worker -P
solo -c 1`), so a job's compute never holds the API's GIL and a crashing job cannot
take the API down. The parent migrates the database, makes a local API key on first
start, requeues what a previous run left behind, then serves HTTP until interrupted.

It lives in the CLI because it composes the API with a worker process: the API and the
worker never import each other.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select

from svdforge.persistence import migrate
from svdforge.persistence.db import Database
from svdforge.persistence.jobs import artifact_prefix, recover_orphans
from svdforge.persistence.keys import create_key, find_key
from svdforge.persistence.logs import configure_logging
from svdforge.persistence.queue import QUEUE
from svdforge.persistence.settings import Settings
from svdforge.persistence.storage import make_storage
from svdforge.persistence.tables import ApiKey

log = logging.getLogger("svdforge.serve")


def worker_command(settings: Settings, name: str = "embedded") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "svdforge.worker.app", "worker", "-Q", QUEUE, "-c", "1", "-P", "solo",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO", "-n", f"{name}@%h"]


@contextmanager
def data_dir_lock(settings: Settings):
    """One `serve` per data folder: two would each believe every running job is theirs."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    f = open(settings.data_dir / "serve.lock", "w")  # noqa: SIM115 - held open, and locked, while serve runs
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SystemExit(f"another `svdforge serve` is using {settings.data_dir}") from None
    try:
        yield
    finally:
        f.close()


def ensure_local_key(db: Database, settings: Settings) -> tuple[Path, bool]:
    """The key file for local use: reused while it still names an active key, else created."""
    path = settings.api_key_file
    with db.begin() as s:
        if path.is_file() and find_key(s, path.read_text().strip()) is not None:
            return path, False
        key, token = create_key(s, "local")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path, True


def prepare(settings: Settings) -> tuple[Database, Path, bool]:
    """Migrate, make the local key, and settle the jobs a previous run left running.

    No worker is alive yet, so every running job is an orphan: requeued (its queue message
    is sent by the worker's reaper, which sweeps at start and then periodically), or
    cancelled if a cancel was pending. A requeued job resumes from its checkpoint if it had one.
    """
    settings.ensure_dirs()
    db = Database(settings)
    migrate.upgrade(db)
    key_file, created = ensure_local_key(db, settings)
    with db.begin() as s:
        found = recover_orphans(s, max_attempts=settings.max_attempts, everything_active=True)
    storage = make_storage(settings)
    for job_id in found.cancelled + found.failed:
        storage.delete_prefix(artifact_prefix(job_id))
    if found.requeued or found.failed or found.cancelled:
        log.warning("previous run left jobs behind: requeued %s, failed %s, cancelled %s",
                    found.requeued, found.failed, found.cancelled)
    return db, key_file, created


def _prepare_worker_process() -> None:
    """In the worker child, before exec: it ends when `serve` ends (Linux PR_SET_PDEATHSIG),
    and it runs at a lower CPU priority, so the API stays responsive while a job computes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass
    os.nice(10)


def start_worker(settings: Settings) -> subprocess.Popen:
    env = {**os.environ, **settings.as_env()}
    return subprocess.Popen(worker_command(settings), env=env, preexec_fn=_prepare_worker_process)  # noqa: PLW1509 - no threads yet; the child must die with serve


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop_worker(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Warm shutdown: the worker's running job stops at its next boundary and is requeued.

    A worker still busy after the grace period is stopped cold (then killed); its job is
    requeued when `serve` starts again.
    """
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGQUIT)  # Celery's cold shutdown
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    from svdforge.api.main import create_app

    configure_logging(settings.log_format, settings.log_level)  # the worker child does the same (worker/app.py)
    with data_dir_lock(settings):
        db, key_file, created = prepare(settings)
        with db.session() as s:
            n_keys = len(s.scalars(select(ApiKey.id)).all())
        db.dispose()
        print(f"svdforge: data in {settings.data_dir} ({settings.database_url.split(':', 1)[0]}, "
              f"{settings.storage} storage, {settings.broker_url.split(':', 1)[0]} queue)", flush=True)
        print(f"svdforge: local API key {'created' if created else 'kept'} in {key_file} "
              f"(send it as 'Authorization: Bearer <key>'; {n_keys} key(s) in the database)", flush=True)
        worker = start_worker(settings)
        # uvicorn re-raises the SIGTERM it handled once it has stopped; this turns it into an
        # exception so that the `finally` below still stops the worker.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            print(f"svdforge: API on http://{host}:{port} (docs at /docs), worker pid {worker.pid}", flush=True)
            uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False,
                        log_config=None)  # svdforge's handler (persistence/logs.py), not uvicorn's
        finally:
            stop_worker(worker)

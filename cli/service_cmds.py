"""`svdforge serve | worker | migrate | check | keys ...`: running the service from the shell.

Settings come from `SVDFORGE_*` variables; `--data-dir` is a shortcut for SVDFORGE_DATA_DIR.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from svdforge.cli.app import app

DataDir = Annotated[Path | None,
                    typer.Option("--data-dir", help="Data folder (default: $SVDFORGE_DATA_DIR or ./var).")]


def _settings(data_dir: Path | None):
    from svdforge.persistence.settings import Settings

    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


@app.command()
def serve(host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
          data_dir: DataDir = None) -> None:
    """Run the API and a worker on this machine (SQLite, local files, no queue server)."""
    from svdforge.cli.embedded import serve as run

    run(_settings(data_dir), host=host, port=port)


@app.command()
def worker(data_dir: DataDir = None,
           name: Annotated[str, typer.Option("--name", help="Celery node name.")] = "worker") -> None:
    """Run one production worker (queue `gpu`, one job at a time) against SVDFORGE_BROKER_URL."""
    from svdforge.cli.embedded import worker_command

    settings = _settings(data_dir)
    settings.ensure_dirs()
    os.environ.update(settings.as_env())
    cmd = worker_command(settings, name)
    os.execv(cmd[0], cmd)


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Create or upgrade the database schema (Alembic, to the latest revision)."""
    from svdforge.persistence import migrate as mig
    from svdforge.persistence.db import Database

    settings = _settings(data_dir)
    db = Database(settings)
    mig.upgrade(db)
    typer.echo(f"database at the latest revision: {settings.database_url.split('://', 1)[0]}")


@app.command()
def check(data_dir: DataDir = None) -> None:
    """Check that the database is migrated and the broker and storage answer; exit 1 if not.

    The containers' healthchecks run it: it needs no HTTP server, so it fits the worker too
    (whose one Celery process is busy while a job runs and cannot answer a ping).
    """
    from svdforge.persistence import migrate as mig
    from svdforge.persistence.db import Database
    from svdforge.persistence.queue import make_celery
    from svdforge.persistence.storage import make_storage

    settings = _settings(data_dir)

    def database() -> None:
        db = Database(settings)
        try:
            missing = mig.pending(db)
        finally:
            db.dispose()
        if missing:
            raise RuntimeError(f"not migrated: {len(missing)} revision(s) pending (run `svdforge migrate`)")

    def broker() -> None:
        if settings.is_filesystem_broker and not settings.queue_dir.is_dir():
            raise RuntimeError(f"queue folder {settings.queue_dir} is missing")
        with make_celery(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    failed = False
    for name, fn in (("database", database), ("broker", broker), ("storage", make_storage(settings).check)):
        try:
            fn()
            typer.echo(f"{name}: ok")
        except Exception as e:  # noqa: BLE001 - report every check on one line each
            failed = True
            typer.echo(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                       err=True)
    if failed:
        raise SystemExit(1)  # (typer.Exit's code is dropped: the CLI runs with standalone_mode=False)


keys = typer.Typer(help="API keys (stored hashed; a key is shown once, when it is created).", no_args_is_help=True)
app.add_typer(keys, name="keys")


def _db(data_dir: Path | None):
    from svdforge.persistence import migrate as mig
    from svdforge.persistence.db import Database

    db = Database(_settings(data_dir))
    mig.upgrade(db)
    return db


@keys.command("create")
def keys_create(name: Annotated[str, typer.Option("--name", help="Who or what the key is for.")],
                data_dir: DataDir = None) -> None:
    """Create a key and print it (this is the only time it is shown)."""
    from svdforge.persistence.keys import create_key

    db = _db(data_dir)
    try:
        with db.begin() as s:
            key, token = create_key(s, name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--name") from None
    typer.echo(token)
    typer.echo(f"created {key.id} ({key.name}); store the key now, it cannot be shown again", err=True)


@keys.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys (id, name, prefix, created, revoked); never the keys themselves."""
    from sqlalchemy import select

    from svdforge.persistence.tables import ApiKey

    db = _db(data_dir)
    with db.session() as s:
        for k in s.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            revoked = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
            typer.echo(f"{k.id}  {k.name:<20}  {k.prefix}...  {k.created_at:%Y-%m-%d %H:%M}  {revoked}")


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")],
                data_dir: DataDir = None) -> None:
    """Revoke a key: its requests get 401 from now on."""
    from svdforge.persistence.keys import revoke_key

    db = _db(data_dir)
    with db.begin() as s:
        if not revoke_key(s, key_id):
            raise typer.BadParameter(f"no active key {key_id}", param_hint="KEY_ID")
    typer.echo(f"revoked {key_id}")


if __name__ == "__main__":  # `python -m svdforge.cli.service_cmds serve` works without the core commands
    app()

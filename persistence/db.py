"""Engines and sessions.

SQLite is used by several processes at once (the API's threads and the worker), so it
runs in WAL mode (readers never block) with a busy timeout, and a session that will write
takes the write lock when its transaction begins (`BEGIN IMMEDIATE`). Without that, a
transaction that reads and then writes can fail at once with "database is locked" when
another writer committed in between (SQLite cannot upgrade a stale read snapshot).

Writers of one process also share a single connection (a pool of one): they queue on
the pool, which wakes the next one as soon as the connection is back, instead of each
polling SQLite's lock with growing sleeps (which made p99 latency under load). The
rule that comes with it: never open a second write session while holding one.
PostgreSQL needs none of this and uses one ordinary pool.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from svdforge.persistence.settings import Settings

_BEGIN_OPTION = "svdforge_sqlite_begin"


def make_engine(settings: Settings, *, writer: bool = False, **kwargs: Any) -> Engine:
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 60} if writer else \
               {"pool_size": 20, "max_overflow": 40}
        engine = create_engine(settings.database_url, connect_args={"check_same_thread": False, "timeout": 30},
                               **pool, **kwargs)
        _configure_sqlite(engine)
        return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"}) if writer else engine
    return create_engine(normalize_url(settings.database_url), pool_pre_ping=True, **kwargs)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default driver for it is psycopg2)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _configure_sqlite(engine: Engine) -> None:
    """WAL, foreign keys, and explicit BEGIN so that writers can ask for IMMEDIATE.

    pysqlite's own transaction handling is turned off (isolation_level=None) and the
    BEGIN is emitted here instead: the recipe from SQLAlchemy's SQLite dialect docs.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """An engine and its session factory; one per process and settings."""

    def __init__(self, settings: Settings, **engine_kwargs: Any) -> None:
        self.settings = settings
        self.engine = make_engine(settings, **engine_kwargs)
        self.write_engine = make_engine(settings, writer=True, **engine_kwargs) if settings.is_sqlite else self.engine
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        self.write_sessionmaker = sessionmaker(self.write_engine, expire_on_commit=False)

    def session(self, *, write: bool = False) -> Session:
        """A new session; with `write=True` every transaction takes SQLite's write lock at BEGIN."""
        return (self.write_sessionmaker if write else self.sessionmaker)()

    @contextmanager
    def begin(self, *, write: bool = True) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error."""
        session = self.session(write=write)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
        self.write_engine.dispose()

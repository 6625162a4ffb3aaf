"""Alembic: the migrations build exactly the tables' schema, go down and up again, and
render for PostgreSQL. With SVDFORGE_TEST_DATABASE_URL=postgresql://... the whole service
suite, this file included, runs on a live PostgreSQL instead of SQLite."""
from __future__ import annotations

import io

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from svdforge.persistence import migrate
from svdforge.persistence.db import Database
from svdforge.persistence.tables import Base

from .conftest import fresh_database, make_settings


def _diff(db: Database) -> list:
    with db.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def test_upgrade_matches_the_tables_and_downgrades(tmp_path):
    """On SQLite, or on PostgreSQL when SVDFORGE_TEST_DATABASE_URL names one."""
    db = fresh_database(make_settings(tmp_path))
    assert _diff(db) == []
    assert {"api_keys", "files", "jobs", "job_events", "artifacts"} <= set(inspect(db.engine).get_table_names())
    migrate.upgrade(db)  # idempotent
    cfg = migrate.alembic_config(db.settings.database_url)
    with db.write_engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    migrate.upgrade(db)
    assert _diff(db) == []
    db.dispose()


def test_postgresql_sql_renders(capsys):
    """Offline mode: the same revision compiled for PostgreSQL (no server needed)."""
    cfg = migrate.alembic_config("postgresql://user@localhost/svdforge")
    cfg.output_buffer = io.StringIO()
    command.upgrade(cfg, "head", sql=True)
    sql = cfg.output_buffer.getvalue()
    assert "CREATE TABLE jobs" in sql and "CREATE TABLE job_events" in sql
    assert "BIGSERIAL" in sql  # event ids auto-increment on PostgreSQL too
    assert "JSON" in sql and "TIMESTAMP WITHOUT TIME ZONE" in sql

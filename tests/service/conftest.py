"""Fixtures for the service tests: a migrated database in a temporary data folder, an app
around it, two API keys, and a tiny random model (core.testing) for real jobs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from svdforge.api.main import create_app
from svdforge.persistence import migrate
from svdforge.persistence.db import Database
from svdforge.persistence.keys import create_key
from svdforge.persistence.settings import Settings

TINY_REQUEST_OPTIONS = {
    "calibration": {"source": "builtin", "samples": 4, "seq_len": 32},
    "evaluation": {"source": "builtin", "seq_len": 32, "max_tokens": 256, "throughput": False},
}


# SQLite by default; SVDFORGE_TEST_DATABASE_URL=postgresql://... runs the same tests on PostgreSQL.
TEST_DATABASE_URL = os.environ.get("SVDFORGE_TEST_DATABASE_URL", "")


def make_settings(root: Path, **overrides) -> Settings:
    (root / "models").mkdir(parents=True, exist_ok=True)
    values = {"data_dir": root / "data", "model_root": root / "models", "progress_interval_s": 0.05,
              "max_upload_bytes": 64 * 1024, "broker_url": "filesystem://", "storage": "local",
              "database_url": TEST_DATABASE_URL, "storage_dir": None}
    values.update(overrides)
    return Settings(**values)


def fresh_database(settings: Settings) -> Database:
    """A migrated, empty database (a shared PostgreSQL one is emptied first)."""
    database = Database(settings)
    if not settings.is_sqlite:
        from sqlalchemy import text

        from svdforge.persistence.tables import Base

        with database.write_engine.begin() as conn:
            Base.metadata.drop_all(conn)
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    migrate.upgrade(database)
    return database


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def db(settings: Settings):
    database = fresh_database(settings)
    yield database
    database.dispose()


@pytest.fixture
def tokens(db: Database) -> dict[str, str]:
    with db.begin() as s:
        _, alice = create_key(s, "alice")
        _, bob = create_key(s, "bob")
    return {"alice": alice, "bob": bob}


@pytest.fixture
def auth(tokens) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['alice']}"}


@pytest.fixture
def other_auth(tokens) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['bob']}"}


@pytest.fixture
def app(settings: Settings, db: Database):
    return create_app(settings)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory) -> Path:
    """A folder holding one tiny llama (`tiny`), shared by every test that runs a real job."""
    from svdforge.core.testing import make_tiny_model

    root = tmp_path_factory.mktemp("model_root")
    make_tiny_model(root / "tiny", arch="llama")
    return root

"""Run the Alembic migrations from code (`svdforge serve`, `svdforge migrate`, tests).

The schema is always created by the migrations, never by `metadata.create_all`, so
that what runs in tests is what runs in production.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config

from svdforge.persistence.db import Database

# Alembic's scripts: the `svdforge.migrations` package's folder, wherever it is installed. Found
# by name, like alembic.ini's `script_location`, not imported: the migrations depend on
# persistence (env.py reads the tables), not the other way round.
MIGRATIONS_PACKAGE = "svdforge.migrations"


def scripts_dir() -> Path:
    return Path(str(resources.files(MIGRATIONS_PACKAGE))).resolve()


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts_dir()))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the database to `revision`, on the engine's own connection."""
    cfg = alembic_config(db.settings.database_url)
    with db.write_engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def pending(db: Database) -> list[str]:
    """Revisions the database still lacks (empty: at the latest one). Reads, never writes."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(db.settings.database_url))
    with db.write_engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    if current >= set(script.get_heads()):
        return []
    have = {r.revision for c in current for r in script.iterate_revisions(c, "base")}
    return [r.revision for r in script.walk_revisions() if r.revision not in have][::-1]

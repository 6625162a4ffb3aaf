"""Service settings, read from `SVDFORGE_*` environment variables (pydantic-settings).

One object configures the API, the worker and the CLI, so that `svdforge serve` can hand
its settings to the worker process through the environment alone. Everything defaults to
the embedded mode: a data folder (`./var` or `$SVDFORGE_DATA_DIR`) holding a SQLite
database, a filesystem message queue, the artifact store, uploads and the local API key.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SVDFORGE_", extra="ignore")

    data_dir: Path = Path("var")
    database_url: str = ""  # empty: sqlite:///<data_dir>/svdforge.db
    broker_url: str = "filesystem://"  # production: redis://host:6379/0
    broker_visibility_timeout_s: int = 24 * 3600  # Redis redelivers unacked tasks after this

    storage: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # local backend root; empty: <data_dir>/storage
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None  # MinIO / SeaweedFS
    s3_region: str | None = None
    presign_expires_s: int = Field(3600, ge=60, le=7 * 24 * 3600)

    model_root: Path | None = None  # local model paths must resolve inside this folder
    allow_hub_models: bool = True
    # Both run code chosen by the checkpoint's author inside the worker: off unless an operator opts in.
    allow_pickle: bool = False  # .bin/.pt/.pth/.ckpt weights (torch.load)
    trust_remote_code: bool = False  # a model folder's or hub repo's own Python modules
    max_upload_bytes: int = Field(100 * MiB, ge=1)

    progress_interval_s: float = Field(1.0, gt=0.0)  # worker flushes progress, renews its lease, reads cancel
    lease_s: int = Field(600, ge=10)  # a running job's lease, renewed with every progress write
    max_attempts: int = Field(3, ge=1)
    worker_threads: int | None = None  # torch threads in the worker; None: torch's default
    device: str = "auto"

    @model_validator(mode="after")
    def _fill_paths(self) -> "Settings":
        # absolute, so that the worker process and every cwd agree on the same files
        self.data_dir = Path(self.data_dir).expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'svdforge.db'}"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "storage"
        self.storage_dir = Path(self.storage_dir).expanduser().absolute()
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("SVDFORGE_S3_BUCKET is required when SVDFORGE_STORAGE=s3")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_filesystem_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def work_dir(self) -> Path:
        """Scratch space where the worker lets `compress` write before uploading."""
        return self.data_dir / "work"

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api_key"

    def ensure_dirs(self) -> None:
        """Create the local folders this configuration writes into."""
        for d in (self.data_dir, self.work_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.is_filesystem_broker:
            self.queue_dir.mkdir(parents=True, exist_ok=True)
        if self.storage == "local":
            assert self.storage_dir is not None
            self.storage_dir.mkdir(parents=True, exist_ok=True)

    def as_env(self) -> dict[str, str]:
        """The environment that recreates these settings in another process (the worker)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            env[f"SVDFORGE_{name.upper()}"] = str(value)
        return env


@lru_cache
def get_settings() -> Settings:
    return Settings()

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

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SVDFORGE_", extra="ignore")

    data_dir: Path = Path("var")
    database_url: str = ""  # empty: sqlite:///<data_dir>/svdforge.db
    broker_url: str = "filesystem://"  # production: redis://host:6379/0
    # Redis redelivers an unacknowledged message after this. Only a backstop: jobs of lost
    # workers are recovered by the database lease and reaper below, and a redelivered message
    # of a job that is running or done is dropped by the claim (it cannot run a job twice).
    broker_visibility_timeout_s: int = Field(3600, ge=60)

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

    # Lease and reaper (README "Crash safety"): a running job's lease is renewed by its
    # worker every progress_interval_s (the heartbeat, with progress); a reaper thread in
    # every worker requeues jobs whose lease ran out, every reap_interval_s (default lease/3),
    # and fails a job with `worker_lost` once it has used max_attempts. Recovery after a
    # kill -9 takes about lease_s + reap_interval_s.
    progress_interval_s: float = Field(1.0, gt=0.0)  # worker flushes progress, renews its lease, reads cancel
    lease_s: int = Field(60, ge=2)
    reap_interval_s: float | None = Field(None, gt=0.0)
    max_attempts: int = Field(3, ge=1)
    enqueue_grace_s: float = Field(10.0, ge=0.0)  # a job the API committed but did not enqueue is sent after this
    resend_after_s: float = Field(900.0, gt=0.0)  # a queued job not started this long after its send is sent again
    # GET /v1/jobs/{id}/events with `Accept: text/event-stream` (api/event_stream.py): a keep-alive
    # comment this often (proxies close idle connections), and the new events of all followed jobs
    # read from the database this often, by one poller per API process, in one statement and one
    # short session per read (none is held across the wait).
    sse_keepalive_s: float = Field(15.0, gt=0.0)
    sse_poll_s: float = Field(0.5, gt=0.0, le=60.0)
    checkpoints: bool = True  # upload the saved artifact before evaluation, so that a retry resumes there
    worker_threads: int | None = None  # torch threads in the worker; None: torch's default
    device: str = "auto"

    # Webhooks (README "Webhooks"): a dispatcher thread in every worker sends due deliveries (polling
    # every webhooks_poll_s), each attempt under webhooks_timeout_s; an attempt that gets no 2xx is
    # tried again after the next delay of webhooks_retry_schedule_s (seconds after the failed attempt),
    # and the delivery is given up once the schedule is used (default: 9 attempts over about 11 h).
    # URLs whose host is loopback, private, link-local, multicast or reserved are refused, at
    # registration and at each delivery, unless webhooks_allow_private; cloud metadata addresses always.
    webhooks_allow_private: bool = False
    webhooks_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0], max_length=50)
    webhooks_timeout_s: float = Field(10.0, gt=0.0, le=60.0)
    webhooks_poll_s: float = Field(1.0, gt=0.0)
    webhooks_max_per_key: int = Field(20, ge=1)

    # Operations (README "Operations"). Logs: one line per record on stderr, JSON objects
    # (`ts`, `level`, `logger`, `message`, `job_id`, `request_id`, ...) or text for a terminal.
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True  # one API line per request (health probes and /metrics at DEBUG)
    # Metrics: GET /metrics in the Prometheus text format (false: 404). It needs no API key:
    # expose it on the operators' network only, or set metrics_token, or give it its own port.
    metrics_enabled: bool = True
    # Serve the metrics on this port (prometheus_client's HTTP server, in the API process) and
    # not on the API's; 0 picks a free one. One API process per port (uvicorn --workers 1).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # the address metrics_port binds (0.0.0.0 in a container)
    metrics_token: SecretStr | None = None  # /metrics on the API port then wants `Authorization: Bearer <token>`

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        # absolute, so that the worker process and every cwd agree on the same files
        self.data_dir = Path(self.data_dir).expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'svdforge.db'}"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "storage"
        self.storage_dir = Path(self.storage_dir).expanduser().absolute()
        if self.lease_s < 2 * self.progress_interval_s:
            raise ValueError("SVDFORGE_LEASE_S must be at least twice SVDFORGE_PROGRESS_INTERVAL_S (the heartbeat)")
        if any(d < 0 for d in self.webhooks_retry_schedule_s):
            raise ValueError("SVDFORGE_WEBHOOKS_RETRY_SCHEDULE_S: delays must be >= 0 seconds")
        if self.metrics_token is not None and self.metrics_port is not None:
            raise ValueError("SVDFORGE_METRICS_TOKEN guards /metrics on the API port; the separate "
                             "SVDFORGE_METRICS_PORT is guarded by its bind address (SVDFORGE_METRICS_HOST): set one")
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("SVDFORGE_S3_BUCKET is required when SVDFORGE_STORAGE=s3")
        return self

    @property
    def reap_every_s(self) -> float:
        return self.reap_interval_s if self.reap_interval_s is not None else self.lease_s / 3

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
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"SVDFORGE_{name.upper()}"] = str(value)
        return env


@lru_cache
def get_settings() -> Settings:
    return Settings()

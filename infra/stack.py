"""The local stack on 127.0.0.1: S3 (moto_server), MLflow server, Prefect server + process worker.

    python infra/stack.py up        # start what is not running, wait until healthy, register deployments
    python infra/stack.py status    # one line per service: pid, alive, health
    python infra/stack.py env       # `export ...` lines pointing a shell at the stack
    python infra/stack.py deploy    # (re)register the deployments on the running stack
    python infra/stack.py down      # stop everything it started (by PID file)

`up` and `down` are idempotent: `up` on a stack whose services all run and answer is a no-op
that says so (`deploy` re-registers), `up` after `down` starts it again (the work pool and the
deployments already in Prefect's database are kept/updated), `down` on a stopped stack says
"nothing was running". If `up` fails half-way it stops every service that this `up` started
(and only those: what already ran stays), removes their PID files and exits with status 1.
Before starting a service, `up` checks that its port is free: a port held by another program
is an error, never mistaken for our service.

(`make stack-up` / `make stack-status` / `make stack-down` call these.) Everything is bound
to 127.0.0.1, telemetry is off, PID files live in `<state>/pids/`, logs in `<state>/logs/`
(state: `.infra/` of the project). Ports and backends come from the environment:

| variable | default | meaning |
| --- | --- | --- |
| CPCSAM_S3_PORT | 9000 | moto_server (S3 API) |
| CPCSAM_MLFLOW_PORT | 5000 | MLflow tracking server + UI |
| CPCSAM_PREFECT_PORT | 4200 | Prefect API + UI |
| CPCSAM_WORKER_HEALTH_PORT | 8765 | the worker's health endpoint |
| CPCSAM_WORK_POOL | cpcsam-process | the process work pool of infra/prefect.yaml |
| CPCSAM_WORKER_POLL_SECONDS | 2 | how often the worker asks for scheduled runs (Prefect's default: 10) |
| CPCSAM_STACK_DATABASE | unset | a PostgreSQL server for both stores, see below |
| CPCSAM_MLFLOW_BACKEND_URI | sqlite:///<project>/mlflow.db | MLflow's store alone (wins over CPCSAM_STACK_DATABASE) |
| CPCSAM_MLFLOW_ARTIFACTS | <project>/mlruns | e.g. s3://cpcsam-mlflow/artifacts (served through the server) |
| CPCSAM_S3_EXTERNAL | unset | 1 = use the AWS_* environment's S3, do not start moto_server |

The MLflow server's default store is the project's own `mlflow.db` + `mlruns/`, the same one
the embedded (server-less) mode writes, so the UI shows every run.

PostgreSQL instead of sqlite for both servers takes one variable, the server's URL:

    export CPCSAM_STACK_DATABASE=postgresql://USER:PASSWORD@127.0.0.1:5432/
    python infra/stack.py up

MLflow then stores in `postgresql://USER:PASSWORD@127.0.0.1:5432/mlflow` (psycopg2) and Prefect in
`postgresql+asyncpg://USER:PASSWORD@127.0.0.1:5432/prefect`; `up` creates the two databases unless
they exist (USER needs CREATEDB, or create them beforehand). The URL's path, if any, names the
database `up` connects to for that (default `postgres`). Percent-encode special characters of the
password. The URL reaches only the two servers (through their environment, never a command line)
and every log line and message shows it with the password as `***`. Artifacts stay where
CPCSAM_MLFLOW_ARTIFACTS says. Unset (the default), both servers use sqlite as before.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

PROJECT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BUCKETS = ("cpcsam-dvc", "cpcsam-incoming")  # DVC remote (.dvc/config) and the retrain inbox
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",  # the flows' `dvc` calls, also in projects whose .dvc/config does not say it
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else a job runner of 7 processes, ~1.6 GB
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}
DATABASE_ENV = "CPCSAM_STACK_DATABASE"  # postgresql://user:password@host:port/ for MLflow + Prefect
STACK_DATABASES = ("mlflow", "prefect")  # the databases `up` creates on that server
def mask(text: str, *secrets: str | None) -> str:
    """`text` with every secret `cpcsam.redact` knows (URI passwords, secret env values, ...) and each
    of `secrets` (e.g. the database password, wherever it shows on its own) replaced by `***`."""
    from cpcsam.redact import redact

    out = redact(text)
    for secret in secrets:
        if secret and len(secret) >= 4:  # a shorter one would garble ordinary words
            out = out.replace(secret, "***")
    return out


@dataclass(frozen=True)
class StackDatabase:
    """The PostgreSQL server of CPCSAM_STACK_DATABASE and the URLs the two servers get from it."""

    url: str

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme.split("+")[0] not in ("postgresql", "postgres") or not parts.hostname:
            raise StackError(f"{DATABASE_ENV}={mask(self.url)}: expected postgresql://USER:PASSWORD@HOST[:PORT]/")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise StackError(f"{DATABASE_ENV}={mask(self.url)}: {exc}") from None

    def _url(self, scheme: str, database: str, query: bool = True) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query if query else "", ""))

    @property
    def password(self) -> str | None:
        from urllib.parse import unquote

        raw = urlsplit(self.url).password
        return unquote(raw) if raw else None

    @property
    def admin_url(self) -> str:
        """Where `up` connects to create the databases: the URL's own database, else `postgres`."""
        return self._url("postgresql", urlsplit(self.url).path.strip("/") or "postgres")

    @property
    def mlflow_url(self) -> str:
        return self._url("postgresql", "mlflow")  # SQLAlchemy's default PostgreSQL driver: psycopg2

    @property
    def prefect_url(self) -> str:
        # asyncpg takes no libpq query options (sslmode=...): Prefect has its own TLS settings
        return self._url("postgresql+asyncpg", "prefect", query=False)

    def masked(self, url: str | None = None) -> str:
        return mask(url or self.url, self.password)

    def ensure_databases(self, timeout: float = 30.0) -> list[str]:
        """Create the `mlflow` and `prefect` databases unless they exist; the ones it created.
        Waits up to `timeout` s for the server to accept connections (one just started)."""
        try:
            import psycopg2
            from psycopg2 import errors, sql
        except ImportError:
            raise StackError(f"{DATABASE_ENV} needs psycopg2 (MLflow's PostgreSQL driver): "
                             "pip install -e '.[test]' (psycopg2-binary)") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = psycopg2.connect(self.admin_url, connect_timeout=5)
                break
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline or "password authentication failed" in str(exc):
                    raise StackError(f"PostgreSQL at {self.masked(self.admin_url)} refused the connection: "
                                     f"{self.masked(str(exc).strip())}") from None
                time.sleep(0.5)
        created = []
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                for name in STACK_DATABASES:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is not None:
                        continue
                    try:
                        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                        created.append(name)
                    except errors.DuplicateDatabase:  # created meanwhile by someone else
                        pass
        except psycopg2.Error as exc:
            raise StackError(f"PostgreSQL at {self.masked(self.admin_url)}: could not create the databases "
                             f"{', '.join(STACK_DATABASES)}: {self.masked(str(exc).strip())}") from None
        finally:
            conn.close()
        return created


def _exe(name: str) -> str:
    """A console script of this interpreter's venv, else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def _get(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) from /proc, or None (no such process, or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
    return fields[0], int(fields[2])


def _proc_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead (and is reaped)
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    stat = _proc_stat(pid)  # a zombie of another parent, too
    return not (stat is not None and stat[0] == "Z")


def _default_sigint() -> None:
    """In a service's child process, before exec: Ctrl-C back to its default. A shell without job
    control (`make stack-up &`, nohup, some CI runners) starts its commands with SIGINT ignored and
    that is inherited through exec; a Python service started so never raises KeyboardInterrupt,
    and `stop` would wait out both SIGINT steps (~13 s) before its SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in a process group: a service's children
    (MLflow's uvicorn, ...) can outlive its leader for a moment and still hold the port."""
    if pid_alive(pgid):
        return True
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat is not None and stat[1] == pgid and stat[0] != "Z":
                    return True
        return False
    try:  # no /proc: ask the kernel (zombies count as members here)
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something listens on (or has bound) host:port. SO_REUSEADDR: TIME_WAIT of a
    just-stopped server does not count, a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


class StackError(RuntimeError):
    """`up` failed; what it had started is stopped again (`stopped`)."""

    def __init__(self, message: str, stopped: list[str] | None = None, left: list[str] | None = None):
        super().__init__(message)
        self.stopped = stopped or []
        self.left = left or []  # started by this `up` but would not stop (PID files kept)


@dataclass
class Service:
    name: str
    cmd: list[str]
    health_url: str
    env: dict[str, str] = field(default_factory=dict)
    healthy: Callable[[int | None], bool] = lambda status: status == 200
    start_timeout: float = 120.0
    port: int | None = None  # what it listens on: must be free before it starts

    def owns(self, pid: int) -> bool:
        """Whether the process `pid` (from a PID file) is this service and not a stranger that got
        the PID after a reboot: our services lead their own process group and run `cmd`."""
        try:
            if os.getpgid(pid) != pid:
                return False
        except OSError:
            return False
        argv = _proc_argv(pid)
        if not argv:  # no /proc (or a zombie): trust the PID file
            return True
        exe = Path(self.cmd[0]).name
        return any(Path(arg).name == exe for arg in argv[:2]) and all(a in argv for a in self.cmd[1:2])


SERVICE_ORDER = ("s3", "mlflow", "prefect-server", "prefect-worker")  # start order (the servers start together)


@dataclass
class Stack:
    """The local stack of one project. Tests make one on free ports with a temporary state dir."""

    project: Path = PROJECT
    state: Path | None = None
    s3_port: int = int(os.environ.get("CPCSAM_S3_PORT", 9000))
    mlflow_port: int = int(os.environ.get("CPCSAM_MLFLOW_PORT", 5000))
    prefect_port: int = int(os.environ.get("CPCSAM_PREFECT_PORT", 4200))
    worker_health_port: int = int(os.environ.get("CPCSAM_WORKER_HEALTH_PORT", 8765))
    work_pool: str = os.environ.get("CPCSAM_WORK_POOL", "cpcsam-process")
    # A run waits for the worker's next poll before it starts: half of this on average. Prefect's
    # default (10 s) is made for many workers on a remote server; one local worker polling every
    # 2 s costs a small API call, and a deployment run or an event-triggered one starts at once.
    worker_poll_seconds: float = float(os.environ.get("CPCSAM_WORKER_POLL_SECONDS", 2))
    external_s3: bool = os.environ.get("CPCSAM_S3_EXTERNAL", "") in {"1", "true", "yes"}
    mlflow_backend: str | None = os.environ.get("CPCSAM_MLFLOW_BACKEND_URI")
    mlflow_artifacts: str | None = os.environ.get("CPCSAM_MLFLOW_ARTIFACTS")
    prefect_home: Path | None = None
    # read when the Stack is made (not at import): PostgreSQL for both servers, None = sqlite
    database: str | None = field(default_factory=lambda: os.environ.get(DATABASE_ENV) or None)

    def __post_init__(self) -> None:
        self.project = Path(self.project).resolve()
        self.state = Path(self.state or self.project / ".infra").resolve()
        self.prefect_home = Path(self.prefect_home or os.environ.get("PREFECT_HOME") or self.project / ".prefect")
        self.db = StackDatabase(self.database) if self.database else None  # StackError if malformed
        for sub in ("pids", "logs"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.started: list[str] = []  # what the last `up` started (empty: it found the stack up)

    # -- addresses
    @property
    def s3_url(self) -> str:
        if self.external_s3:
            return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def client_env(self) -> dict[str, str]:
        """What a shell or the worker needs to use the stack (the worker passes it to flows)."""
        env = {
            **QUIET_ENV,
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_API_URL": self.prefect_api,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "CPCSAM_PROJECT_DIR": str(self.project),
        }
        if not self.external_s3:
            env.update({
                "AWS_ENDPOINT_URL": self.s3_url,
                "AWS_ENDPOINT_URL_S3": self.s3_url,
                "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
                "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            })
        return env

    def services(self) -> list[Service]:
        mlflow_dir = self.project
        backend = self.mlflow_backend or (self.db.mlflow_url if self.db else f"sqlite:///{mlflow_dir / 'mlflow.db'}")
        artifacts = self.mlflow_artifacts or str(mlflow_dir / "mlruns")
        out: list[Service] = []
        if not self.external_s3:
            out.append(Service("s3", [_exe("moto_server"), "-H", HOST, "-p", str(self.s3_port)],
                               f"{self.s3_url}/moto-api/", start_timeout=60, port=self.s3_port))
        out.append(Service(
            "mlflow",
            [_exe("mlflow"), "server", "--host", HOST, "--port", str(self.mlflow_port), "--workers", "1",
             "--artifacts-destination", artifacts],
            f"{self.mlflow_url}/health",
            # The backend store URI may hold a database password: through the environment
            # (`mlflow server` reads MLFLOW_BACKEND_STORE_URI), never on the command line, which
            # `ps` shows to every user and `_launch` writes into the service's log.
            env={**self.client_env(), "MLFLOW_BACKEND_STORE_URI": backend},  # + S3 credentials for S3 artifacts
            port=self.mlflow_port,
        ))
        out.append(Service(
            "prefect-server",
            [_exe("prefect"), "server", "start", "--host", HOST, "--port", str(self.prefect_port)],
            f"{self.prefect_api}/health",
            env={"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.db.prefect_url} if self.db else {},
            port=self.prefect_port,
        ))
        out.append(Service(
            "prefect-worker",
            [_exe("prefect"), "worker", "start", "--pool", self.work_pool, "--type", "process", "--with-healthcheck"],
            f"http://{HOST}:{self.worker_health_port}/health",
            env={**self.client_env(), "PREFECT_WORKER_WEBSERVER_HOST": HOST,
                 "PREFECT_WORKER_WEBSERVER_PORT": str(self.worker_health_port),
                 "PREFECT_WORKER_QUERY_SECONDS": str(self.worker_poll_seconds)},
            port=self.worker_health_port,
        ))
        return out

    # -- files
    def pid_file(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The live process of a service's PID file, else None (no file, dead, or a stranger)."""
        path = self.pid_file(name)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        svc = next((s for s in self.services() if s.name == name), None)
        return pid if svc is None or svc.owns(pid) else None

    def _base_env(self) -> dict[str, str]:
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.prefect_home)}
        # flows run `dvc` and stage commands (`python -m ...`) from this venv
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
        env.pop(DATABASE_ENV, None)  # its password reaches only the servers that use it (Service.env)
        return env

    def mask(self, text: str) -> str:
        """`text` without passwords (the database's, any URL's), for messages and logs."""
        return mask(text, self.db.password if self.db else None)

    # -- lifecycle
    def _launch(self, svc: Service) -> int:
        """Spawn one service (own process group) and write its PID file; no waiting."""
        if svc.port and port_in_use(svc.port):
            raise StackError(f"{svc.name}: port {HOST}:{svc.port} is already in use by another process "
                             f"(not one this stack started: {self.pid_file(svc.name)} names no live process); "
                             "stop it or choose another port with the CPCSAM_*_PORT variables")
        log = open(self.log_file(svc.name), "ab")
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.mask(' '.join(svc.cmd))}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                svc.cmd, cwd=self.project, env={**self._base_env(), **svc.env}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,  # own process group: stopped as a whole
                preexec_fn=_default_sigint,
            )
        finally:
            log.close()
        self.pid_file(svc.name).write_text(f"{proc.pid}\n")
        return proc.pid

    def _wait_healthy(self, svc: Service, pid: int) -> None:
        deadline = time.monotonic() + svc.start_timeout
        while not svc.healthy(_get(svc.health_url)):
            if not pid_alive(pid):
                raise StackError(f"{svc.name} exited during start-up; see {self.log_file(svc.name)}:\n"
                                 + self.mask(self.log_file(svc.name).read_text()[-2000:]))
            if time.monotonic() > deadline:
                raise StackError(f"{svc.name} not healthy at {svc.health_url} after {svc.start_timeout:.0f} s; "
                                 f"see {self.log_file(svc.name)}")
            time.sleep(0.3)
        time.sleep(0.3)
        if not pid_alive(pid):  # healthy, but not ours: something else answers there
            raise StackError(f"{svc.name}: another process answers at {svc.health_url} and ours exited "
                             f"(port in use? set the CPCSAM_*_PORT variables); see {self.log_file(svc.name)}")

    def start(self, svc: Service) -> int:
        """Start one service unless it runs; wait until its health endpoint answers. If it was
        started here and does not come up, it is stopped again (no PID file is left)."""
        pid = self.pid(svc.name)
        if pid is not None:
            self._wait_healthy(svc, pid)
            return pid
        pid = self._launch(svc)
        try:
            self._wait_healthy(svc, pid)
        except BaseException:
            self.stop(svc.name)
            raise
        return pid

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        env = {**self._base_env(), **self.client_env()}
        with open(self.log_file("setup"), "a") as log:
            log.write(self.mask(f"$ {' '.join(args)}\n"))
            proc = subprocess.run(args, cwd=self.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, stdin=subprocess.DEVNULL)
            log.write(self.mask(proc.stdout))
        if check and proc.returncode != 0:
            raise StackError(self.mask(f"`{' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}"))
        return proc

    def create_buckets(self) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)

    def _prefect_api(self, call):
        """`await call(client)` with a Prefect client of this stack's server, in this process.

        The work pool and the schedules are API calls: as `prefect` CLI commands each cost a process
        start (~1.1 CPU-seconds, ~2 s, measured in the test suite), which every `up` paid two or three
        times. `prefect deploy` stays a CLI call: it is what reads infra/prefect.yaml."""
        import asyncio

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def run():
            async with get_client() as client:
                return await call(client)

        with temporary_settings(updates={PREFECT_API_URL: self.prefect_api}):
            return asyncio.run(run())

    def ensure_work_pool(self) -> None:
        """The process work pool, created unless it exists (it survives `down` in Prefect's
        database), with the process worker's default job template, as `prefect work-pool create
        --type process` makes it."""
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

        async def ensure(client) -> str | None:
            try:
                return (await client.read_work_pool(self.work_pool)).type
            except ObjectNotFound:
                pass
            from prefect.workers.process import ProcessWorker

            template = ProcessWorker.get_default_base_job_template()
            with contextlib.suppress(ObjectAlreadyExists):  # created meanwhile (another `up`)
                await client.create_work_pool(
                    WorkPoolCreate(name=self.work_pool, type="process", base_job_template=template))
            return None

        try:
            kind = self._prefect_api(ensure)
        except Exception as exc:
            what = f"work pool {self.work_pool!r} on {self.prefect_api}: {type(exc).__name__}: {exc}"
            raise StackError(self.mask(what)) from exc
        if kind is not None and kind != "process":
            raise StackError(f"work pool {self.work_pool!r} exists with type {kind!r}, not 'process'; "
                             "delete it (`prefect work-pool delete`) or set CPCSAM_WORK_POOL")

    def pause_all_schedules(self) -> int:
        """Every active schedule of every deployment on the server made inactive (what `prefect
        deployment schedule pause --all` does); returns how many. Tests: no cron tick may start a run."""
        from prefect.client.schemas.filters import DeploymentFilter

        async def pause(client) -> int:
            paused, offset = 0, 0
            while page := await client.read_deployments(deployment_filter=DeploymentFilter(), limit=200, offset=offset):
                for deployment in page:
                    for schedule in deployment.schedules:
                        if schedule.active:
                            await client.update_deployment_schedule(deployment.id, schedule.id, active=False)
                            paused += 1
                offset += len(page)
            return paused

        try:
            return self._prefect_api(pause)
        except Exception as exc:
            what = f"pausing the schedules on {self.prefect_api}: {type(exc).__name__}: {exc}"
            raise StackError(self.mask(what)) from exc

    def deploy(self, pause_schedules: bool = False) -> None:
        """Create the work pool unless it exists and register (create or update) infra/prefect.yaml's
        deployments, from the project root. Idempotent."""
        self.ensure_work_pool()
        yaml_file = self.project / "infra" / "prefect.yaml"
        self._run([_exe("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(yaml_file)])
        if pause_schedules:
            n = self.pause_all_schedules()
            with open(self.log_file("setup"), "a") as log:
                log.write(f"paused {n} deployment schedule(s)\n")

    def running(self) -> dict[str, bool]:
        """Each service of this stack: True if its PID file names a live process that answers its
        health endpoint."""
        out = {}
        for svc in self.services():
            out[svc.name] = self.pid(svc.name) is not None and svc.healthy(_get(svc.health_url, timeout=2.0))
        return out

    @contextlib.contextmanager
    def _locked(self):
        """One `up`/`down` at a time per state dir (a second `make stack-up` waits, then finds
        the stack up)."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            yield
            return
        with open(self.state / "stack.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def up(self, deploy: bool = True, pause_schedules: bool = False) -> dict[str, int]:
        """Start what is not running, wait until healthy, register the deployments while the worker starts.

        Idempotent: if every service already runs and answers, nothing is started or registered
        (`self.started == []`). On any failure (or Ctrl-C) every service this call started is
        stopped again, in reverse order, and a StackError says what failed and what was stopped;
        services that ran before the call are left alone."""
        with self._locked():
            services = {s.name: s for s in self.services()}
            self.started = []
            if all(self.running().values()):
                return {name: self.pid(name) for name in services}
            pids: dict[str, int] = {}
            try:
                if self.db is not None and not all(self.pid(n) for n in ("mlflow", "prefect-server")):
                    self.db.ensure_databases()  # before the servers that migrate them start
                # The three servers do not need each other: all are launched, then each is waited for,
                # so that their start-ups (imports, database migrations) overlap instead of adding up.
                servers = [services[name] for name in ("s3", "mlflow", "prefect-server") if name in services]
                launched = {svc.name: self._launch_unless_running(svc) for svc in servers}
                for svc in servers:
                    self._wait_healthy(svc, launched[svc.name])
                    pids[svc.name] = launched[svc.name]
                # The worker needs only the Prefect server: launched now, it starts up (imports, its first
                # poll) while the buckets and deployments are made, and is waited for last.
                worker = services["prefect-worker"]
                worker_pid = self._launch_unless_running(worker)
                if "s3" in services:
                    self.create_buckets()
                if deploy:
                    self.deploy(pause_schedules=pause_schedules)
                self._wait_healthy(worker, worker_pid)
                pids["prefect-worker"] = worker_pid
            except BaseException as exc:
                stopped, left = self._rollback()
                if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: as they were
                    raise
                what = (f"stopped what this start had started: {', '.join(stopped)}" if stopped
                        else "it had started nothing")
                if left:
                    what += f"; would NOT stop: {', '.join(left)} (PID files kept; run `down`)"
                raise StackError(f"{exc}\n{what}", stopped=stopped, left=left) from exc
            return pids

    def _launch_unless_running(self, svc: Service) -> int:
        """The running service's PID, or a newly launched one (recorded in self.started at once, so
        that a failure while waiting for it stops it)."""
        pid = self.pid(svc.name)
        if pid is None:
            pid = self._launch(svc)
            self.started.append(svc.name)
        return pid

    def _rollback(self) -> tuple[list[str], list[str]]:
        """Stop what this `up` started, last first. (stopped, would not stop); one that had already
        exited is in neither (its PID file is removed)."""
        stopped, left = [], []
        for name in reversed(self.started):
            if self.stop(name):
                stopped.append(name)
            elif self.pid(name) is not None:
                left.append(name)
        return stopped, left

    def stop(self, name: str, timeout: float = 20.0) -> bool:
        """Stop a service's process group: SIGINT (Ctrl-C, what Prefect and uvicorn shut down cleanly on),
        a second SIGINT (a worker sometimes wants two), SIGTERM, then SIGKILL. Waits until the whole
        group is gone (so its port is free). True if it was running and is stopped; the PID file
        is removed unless the group would not die."""
        return name in self._stop_together([name], timeout)

    def _stop_together(self, names: list[str], timeout: float = 20.0) -> list[str]:
        """`stop` for several services at once (their shutdowns overlap); returns those stopped."""
        alive: dict[str, int] = {}
        for name in names:
            pid = self.pid(name)
            if pid is None:
                self.pid_file(name).unlink(missing_ok=True)  # stale or absent
            else:
                alive[name] = pid
        running = list(alive)
        steps = ((signal.SIGINT, timeout / 3), (signal.SIGINT, timeout / 3), (signal.SIGTERM, timeout / 3),
                 (signal.SIGKILL, 5.0))
        for sig, wait in steps:
            for pid in alive.values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while alive:
                for name, pid in list(alive.items()):
                    if not group_alive(pid):
                        self.pid_file(name).unlink(missing_ok=True)
                        del alive[name]
                if not alive or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
            if not alive:
                break
        return [name for name in running if name not in alive]

    def down(self) -> list[str]:
        """Stop every service with a PID file: the worker first (it talks to the others), then the
        servers together. Idempotent: on a stopped stack it stops nothing and removes stale PID
        files. Raises StackError if one would not die."""
        with self._locked():
            first, *servers = reversed(SERVICE_ORDER)  # all of them, whatever CPCSAM_S3_EXTERNAL says now
            stopped = self._stop_together([first]) + self._stop_together(servers)
            failed = [name for name in SERVICE_ORDER if name not in stopped and self.pid(name) is not None]
            if failed:
                raise StackError(f"would not stop: {', '.join(failed)} (PID files kept)", stopped=stopped)
            return stopped

    def status(self) -> list[dict[str, object]]:
        rows = []
        for svc in self.services():
            pid = self.pid(svc.name)
            code = _get(svc.health_url, timeout=1.0)
            rows.append({"service": svc.name, "pid": pid, "alive": pid is not None,
                         "healthy": svc.healthy(code), "url": svc.health_url, "log": str(self.log_file(svc.name))})
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/stack.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "env", "deploy"])
    parser.add_argument("--state-dir", type=Path, default=None, help="PID files + logs (default: <project>/.infra)")
    parser.add_argument("--no-deploy", action="store_true", help="up: do not (re)register the deployments")
    args = parser.parse_args(argv)
    try:
        stack = Stack(state=args.state_dir)
    except StackError as exc:  # a malformed CPCSAM_STACK_DATABASE
        print(f"stack {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "up":
        try:
            pids = stack.up(deploy=not args.no_deploy)
        except StackError as exc:
            print(f"stack up FAILED: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stack up interrupted; stopped what it had started", file=sys.stderr)
            return 130
        if not stack.started:
            print("stack already up: " + ", ".join(pids) + " running and healthy; nothing started "
                  "(`python infra/stack.py deploy` re-registers the deployments)")
        else:
            for name, pid in pids.items():
                print(f"{name:15s} pid {pid:<8} {'started' if name in stack.started else 'already running'}")
        database = f"database    {stack.db.masked()} ({', '.join(STACK_DATABASES)})\n" if stack.db else ""
        print(f"Prefect UI  http://{HOST}:{stack.prefect_port}\nMLflow UI   {stack.mlflow_url}\n"
              f"S3          {stack.s3_url}\nlogs        {stack.state / 'logs'}\n{database}"
              f"use it:     eval \"$(python infra/stack.py env)\"")
        return 0
    if args.command == "down":
        try:
            stopped = stack.down()
        except StackError as exc:
            print(f"stack down: {exc}; stopped: {', '.join(exc.stopped) or '-'}", file=sys.stderr)
            return 1
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
        return 0
    if args.command == "deploy":
        try:
            stack.deploy()
        except StackError as exc:
            print(f"stack deploy: {exc}", file=sys.stderr)
            return 1
        print(f"work pool {stack.work_pool} and the deployments of infra/prefect.yaml registered")
        return 0
    if args.command == "status":
        rows = stack.status()
        for row in rows:
            state = "healthy" if row["healthy"] else ("running, not healthy" if row["alive"] else "stopped")
            print(f"{row['service']:15s} {state:22s} pid={row['pid'] or '-':<8} {row['url']}")
        return 0 if all(r["healthy"] for r in rows) else 3
    for key, value in stack.client_env().items():
        print(f"export {key}={json.dumps(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

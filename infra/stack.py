"""The local stack on 127.0.0.1: S3 (moto_server), MLflow server, Prefect server + process worker.

    python infra/stack.py up        # start what is not running, wait until healthy, register deployments
    python infra/stack.py status    # one line per service: pid, alive, health
    python infra/stack.py env       # `export ...` lines pointing a shell at the stack
    python infra/stack.py down      # stop everything it started (by PID file)

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
| CPCSAM_MLFLOW_BACKEND_URI | sqlite:///<project>/mlflow.db | e.g. postgresql://mlflow:...@127.0.0.1/mlflow |
| CPCSAM_MLFLOW_ARTIFACTS | <project>/mlruns | e.g. s3://cpcsam-mlflow/artifacts (served through the server) |
| CPCSAM_S3_EXTERNAL | unset | 1 = use the AWS_* environment's S3, do not start moto_server |

The MLflow server's default store is the project's own `mlflow.db` + `mlruns/`, the same one
the embedded (server-less) mode writes, so the UI shows every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PROJECT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BUCKETS = ("cpcsam-dvc", "cpcsam-incoming")  # DVC remote (.dvc/config) and the retrain inbox
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else a job runner of 7 processes, ~1.6 GB
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


@dataclass
class Service:
    name: str
    cmd: list[str]
    health_url: str
    env: dict[str, str] = field(default_factory=dict)
    healthy: Callable[[int | None], bool] = lambda status: status == 200
    start_timeout: float = 120.0


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
    external_s3: bool = os.environ.get("CPCSAM_S3_EXTERNAL", "") in {"1", "true", "yes"}
    mlflow_backend: str | None = os.environ.get("CPCSAM_MLFLOW_BACKEND_URI")
    mlflow_artifacts: str | None = os.environ.get("CPCSAM_MLFLOW_ARTIFACTS")
    prefect_home: Path | None = None

    def __post_init__(self) -> None:
        self.project = Path(self.project).resolve()
        self.state = Path(self.state or self.project / ".infra").resolve()
        self.prefect_home = Path(self.prefect_home or os.environ.get("PREFECT_HOME") or self.project / ".prefect")
        for sub in ("pids", "logs"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)

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
        backend = self.mlflow_backend or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
        artifacts = self.mlflow_artifacts or str(mlflow_dir / "mlruns")
        out: list[Service] = []
        if not self.external_s3:
            out.append(Service("s3", [_exe("moto_server"), "-H", HOST, "-p", str(self.s3_port)],
                               f"{self.s3_url}/moto-api/", start_timeout=60))
        out.append(Service(
            "mlflow",
            [_exe("mlflow"), "server", "--host", HOST, "--port", str(self.mlflow_port), "--workers", "1",
             "--backend-store-uri", backend, "--artifacts-destination", artifacts],
            f"{self.mlflow_url}/health",
            env=self.client_env(),  # S3 credentials when artifacts go to S3
        ))
        out.append(Service(
            "prefect-server",
            [_exe("prefect"), "server", "start", "--host", HOST, "--port", str(self.prefect_port)],
            f"{self.prefect_api}/health",
        ))
        out.append(Service(
            "prefect-worker",
            [_exe("prefect"), "worker", "start", "--pool", self.work_pool, "--type", "process", "--with-healthcheck"],
            f"http://{HOST}:{self.worker_health_port}/health",
            env={**self.client_env(), "PREFECT_WORKER_WEBSERVER_HOST": HOST,
                 "PREFECT_WORKER_WEBSERVER_PORT": str(self.worker_health_port)},
        ))
        return out

    # -- files
    def pid_file(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def pid(self, name: str) -> int | None:
        path = self.pid_file(name)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def _base_env(self) -> dict[str, str]:
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.prefect_home)}
        # flows run `dvc` and stage commands (`python -m ...`) from this venv
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
        return env

    # -- lifecycle
    def start(self, svc: Service) -> int:
        """Start one service unless it runs; wait until its health endpoint answers."""
        pid = self.pid(svc.name)
        if pid is None:
            log = open(self.log_file(svc.name), "ab")
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(svc.cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                svc.cmd, cwd=self.project, env={**self._base_env(), **svc.env}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,  # own process group: stopped as a whole
            )
            log.close()
            pid = proc.pid
            self.pid_file(svc.name).write_text(f"{pid}\n")
        deadline = time.monotonic() + svc.start_timeout
        while not svc.healthy(_get(svc.health_url)):
            if not pid_alive(pid):
                raise RuntimeError(f"{svc.name} exited during start-up; see {self.log_file(svc.name)}:\n"
                                   + self.log_file(svc.name).read_text()[-2000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"{svc.name} not healthy at {svc.health_url} after {svc.start_timeout:.0f} s; "
                                   f"see {self.log_file(svc.name)}")
            time.sleep(0.3)
        time.sleep(0.3)
        if not pid_alive(pid):  # healthy, but not ours: something else holds the port
            self.pid_file(svc.name).unlink(missing_ok=True)
            raise RuntimeError(f"{svc.name}: another process answers at {svc.health_url} and ours exited "
                               f"(port in use? set the CPCSAM_*_PORT variables); see {self.log_file(svc.name)}")
        return pid

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        env = {**self._base_env(), **self.client_env()}
        with open(self.log_file("setup"), "a") as log:
            log.write(f"$ {' '.join(args)}\n")
            proc = subprocess.run(args, cwd=self.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, stdin=subprocess.DEVNULL)
            log.write(proc.stdout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        return proc

    def create_buckets(self) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.s3_url, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)

    def deploy(self, pause_schedules: bool = False) -> None:
        """Create the work pool and register infra/prefect.yaml's deployments (from the project root)."""
        prefect = _exe("prefect")
        pools = self._run([prefect, "work-pool", "ls"], check=False).stdout
        if self.work_pool not in pools:
            self._run([prefect, "work-pool", "create", self.work_pool, "--type", "process"])
        yaml_file = self.project / "infra" / "prefect.yaml"
        self._run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(yaml_file)])
        if pause_schedules:  # tests: no cron tick may start a run mid-test
            self._run([prefect, "--no-prompt", "deployment", "schedule", "pause", "--all"])

    def up(self, deploy: bool = True, pause_schedules: bool = False) -> dict[str, int]:
        pids: dict[str, int] = {}
        services = {s.name: s for s in self.services()}
        for name in ("s3", "mlflow", "prefect-server"):
            if name in services:
                pids[name] = self.start(services[name])
        if "s3" in services:
            self.create_buckets()
        if deploy:
            self.deploy(pause_schedules=pause_schedules)
        pids["prefect-worker"] = self.start(services["prefect-worker"])
        return pids

    def stop(self, name: str, timeout: float = 20.0) -> bool:
        """Stop a service's process group: SIGINT (Ctrl-C, what Prefect and uvicorn shut down cleanly on),
        a second SIGINT (a worker sometimes wants two), SIGTERM, then SIGKILL."""
        pid = self.pid(name)
        self.pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        steps = ((signal.SIGINT, timeout / 3), (signal.SIGINT, timeout / 3), (signal.SIGTERM, timeout / 3),
                 (signal.SIGKILL, 5.0))
        for sig, wait in steps:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not pid_alive(pid):
                    return True
                time.sleep(0.2)
        return not pid_alive(pid)

    def down(self) -> list[str]:
        stopped = []
        for svc in reversed(self.services()):  # worker first, S3 last
            if self.stop(svc.name):
                stopped.append(svc.name)
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
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=None, help="PID files + logs (default: <project>/.infra)")
    parser.add_argument("--no-deploy", action="store_true", help="up: do not (re)register the deployments")
    args = parser.parse_args(argv)
    stack = Stack(state=args.state_dir)
    if args.command == "up":
        try:
            pids = stack.up(deploy=not args.no_deploy)
        except RuntimeError as exc:
            print(f"stack up: {exc}", file=sys.stderr)
            return 1
        for name, pid in pids.items():
            print(f"{name:15s} pid {pid}")
        print(f"Prefect UI  http://{HOST}:{stack.prefect_port}\nMLflow UI   {stack.mlflow_url}\n"
              f"S3          {stack.s3_url}\nlogs        {stack.state / 'logs'}\n"
              f"use it:     eval \"$(python infra/stack.py env)\"")
        return 0
    if args.command == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
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

"""`infra/stack.py` up/down lifecycle: idempotent `up` and `down`, and a failed `up` stops what it started.

The slow tests run the real four services (moto_server, MLflow server, Prefect server + process
worker) on free loopback ports, from a copy of the repository, with their own state dir and
PREFECT_HOME: they never touch the session's stack (conftest.py) or one started by `make stack-up`.
The fast tests use tiny `python -m http.server` processes as stand-in services.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration_helpers import copy_repo, free_port, load_stack_module, prefect_read

stack_module = load_stack_module()
Stack, Service = stack_module.Stack, stack_module.Service
HOST = "127.0.0.1"


# ---- helpers independent of the module under test

def _live_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group (the stack starts each service as one)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def _pid_files(st) -> set[str]:
    return {p.stem for p in (st.state / "pids").glob("*.pid")}


def _assert_gone(st, pgids: dict[str, int], ports: dict[str, int]) -> None:
    deadline = time.monotonic() + 10
    left = {}
    while time.monotonic() < deadline:
        left = {name: members for name, pgid in pgids.items() if (members := _live_members(pgid))}
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"processes left running after the stack stopped them: {left}"
    busy = [f"{name}:{port}" for name, port in ports.items() if _listening(port)]
    assert not busy, f"ports still answering: {busy}"


def _hold_port(port: int) -> subprocess.Popen:
    """Another program listening on `port` (not started by the stack)."""
    code = ("import socket, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _stop_holder(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


# ---- the real stack

@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed copy of the repository: the stack registers its infra/prefect.yaml and keeps
    its MLflow store there, never in the checkout."""
    return copy_repo(tmp_path_factory.mktemp("lifecycle-repo"))


def _real_stack(project: Path, state: Path):
    return Stack(project=project, state=state, s3_port=free_port(), mlflow_port=free_port(),
                 prefect_port=free_port(), worker_health_port=free_port(), external_s3=False,
                 prefect_home=state / "prefect-home")


def _ports(st) -> dict[str, int]:
    return {"s3": st.s3_port, "mlflow": st.mlflow_port, "prefect-server": st.prefect_port,
            "prefect-worker": st.worker_health_port}


ALL = ["s3", "mlflow", "prefect-server", "prefect-worker"]


def _deployments_and_pool(st) -> tuple[set[str], str, int]:
    """The deployment names, the work pool and how many schedules are active on the stack's
    Prefect server, through its API. The pool must be a process pool with the worker's job template."""

    async def read(client) -> tuple[set[str], str, int]:
        deployments = await client.read_deployments()
        pool = await client.read_work_pool(st.work_pool)  # raises ObjectNotFound when missing
        assert pool.type == "process" and "command" in pool.base_job_template["job_configuration"], pool
        active = sum(s.active for d in deployments for s in d.schedules)
        return {d.name for d in deployments}, pool.name, active

    return prefect_read(read, st.prefect_api)


@pytest.mark.slow
def test_failed_up_then_up_down_up_down_with_real_servers(project: Path, tmp_path: Path) -> None:
    """One life of a real stack (each start of the four services costs ~15 CPU-seconds, so the
    cases share it):

    1. `up` fails at the last service (another program holds the worker's health port): the
       services this `up` started (MLflow, Prefect server) are stopped and their PID files
       removed; S3, which ran before, keeps running, and so does the other program.
    2. Once the port is free, `up` brings the stack back; `up` on the healthy stack is a no-op.
    3. `down`, then `up` again: the issue was that this second `up` failed ("Work pool named
       'cpcsam-process' already exists", the pool survives in Prefect's database) and left three
       services running. `down` twice: the second has nothing to stop.
    """
    st = _real_stack(project, tmp_path / "infra")
    (s3,) = [svc for svc in st.services() if svc.name == "s3"]
    s3_pid = st.start(s3)  # up before the first `up`: not its to stop
    holder = _hold_port(st.worker_health_port)
    pgids: dict[str, int] = {"s3#1": s3_pid}
    timings = {}
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError) as failed:
            st.up(deploy=True, pause_schedules=True)
        timings["failed-up"] = time.monotonic() - start
        for name in ("mlflow", "prefect-server"):  # it had started them ...
            assert "===" in st.log_file(name).read_text()
        for name in ("mlflow", "prefect-server", "prefect-worker"):  # ... and stopped them
            assert st.pid(name) is None, f"{name} left running by the failed up"
        assert _pid_files(st) == {"s3"}
        assert not _listening(st.mlflow_port) and not _listening(st.prefect_port)
        assert st.pid("s3") == s3_pid and _listening(st.s3_port)  # S3 was left alone
        assert holder.poll() is None  # and so was the other program
        message = str(failed.value)
        assert f"port {HOST}:{st.worker_health_port} is already in use" in message, message
        assert "stopped what this start had started: prefect-server, mlflow" in message, message
        assert sorted(failed.value.stopped) == ["mlflow", "prefect-server"]
        _stop_holder(holder)

        for round_ in (1, 2):
            start = time.monotonic()
            pids = st.up(deploy=True, pause_schedules=True)  # round 2: the old code failed here
            timings[f"up{round_}"] = time.monotonic() - start
            assert sorted(pids) == sorted(ALL)
            if round_ == 1:  # after the failed up: S3 kept, the rest started
                assert pids["s3"] == s3_pid and st.started == ["mlflow", "prefect-server", "prefect-worker"]
            else:
                assert st.started == ALL
            rows = {row["service"]: row for row in st.status()}
            assert all(row["healthy"] and row["pid"] == pids[name] for name, row in rows.items()), rows
            for name, pid in pids.items():
                pgids[f"{name}#{round_}"] = pid

            # the pool and the deployments exist (created in round 1, kept/updated in round 2), and
            # every schedule is inactive (pause_schedules)
            deployments, pool, active = _deployments_and_pool(st)
            assert {"oceancoco", "deepsea-watch", "deepsea"} <= deployments and pool == st.work_pool, deployments
            assert active == 0, f"{active} schedule(s) left active"

            # `up` on a healthy stack: a no-op that says so (nothing started, same processes)
            start = time.monotonic()
            again = st.up(deploy=True, pause_schedules=True)  # the old code failed here too: pool "already exists"
            timings[f"noop-up{round_}"] = time.monotonic() - start
            assert again == pids and st.started == []

            start = time.monotonic()
            stopped = st.down()
            timings[f"down{round_}"] = time.monotonic() - start
            assert sorted(stopped) == sorted(ALL)
            _assert_gone(st, {k: v for k, v in pgids.items() if k.endswith(f"#{round_}")}, _ports(st))
            assert _pid_files(st) == set()
            assert not any(row["alive"] or row["healthy"] for row in st.status())
            assert st.down() == []  # `down` again: nothing to stop, no error
    finally:
        if holder.poll() is None:
            _stop_holder(holder)
        st.down()
    _assert_gone(st, pgids, _ports(st))
    print("[stack lifecycle] " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


# ---- stand-in services (fast): the rollback logic itself

class _FakeStack(Stack):
    """Three tiny HTTP servers in the roles of the stack's services; the worker may be made to fail."""

    worker_cmd: list[str] | None = None

    def services(self):
        def http(name, port, cmd=None):
            cmd = cmd or [sys.executable, "-m", "http.server", "--bind", HOST, str(port)]
            return Service(name, cmd, f"http://{HOST}:{port}/", start_timeout=20, port=port)

        return [http("mlflow", self.mlflow_port), http("prefect-server", self.prefect_port),
                http("prefect-worker", self.worker_health_port, self.worker_cmd)]


def _fake_stack(tmp_path: Path) -> _FakeStack:
    return _FakeStack(project=tmp_path, state=tmp_path / "infra", s3_port=0, mlflow_port=free_port(),
                      prefect_port=free_port(), worker_health_port=free_port(), external_s3=True,
                      prefect_home=tmp_path / "prefect-home")


def test_up_failing_at_the_last_service_stops_the_others(tmp_path: Path) -> None:
    st = _fake_stack(tmp_path)
    st.worker_cmd = [sys.executable, "-c", "import sys; sys.exit('worker: injected failure')"]
    with pytest.raises(stack_module.StackError) as failed:
        st.up(deploy=False)
    assert "prefect-worker exited during start-up" in str(failed.value)
    assert "injected failure" in str(failed.value)  # the log's tail
    assert failed.value.stopped == ["prefect-server", "mlflow"] and failed.value.left == []
    assert _pid_files(st) == set()
    assert not _listening(st.mlflow_port) and not _listening(st.prefect_port)

    st.worker_cmd = None  # fixed: the next `up` starts all three, the one after is a no-op
    try:
        first = st.up(deploy=False)
        assert st.started == ["mlflow", "prefect-server", "prefect-worker"]
        assert st.up(deploy=False) == first and st.started == []
    finally:
        assert sorted(st.down()) == ["mlflow", "prefect-server", "prefect-worker"]
    _assert_gone(st, first, {"mlflow": st.mlflow_port, "prefect-worker": st.worker_health_port})


@pytest.mark.parametrize("error", [RuntimeError("deploy: injected failure"), KeyboardInterrupt()])
def test_up_failing_in_a_step_keeps_what_ran_before(tmp_path: Path, monkeypatch, error) -> None:
    """A failing step after the servers (deploy; or Ctrl-C) stops what this `up` started, not the
    service that already ran."""
    st = _fake_stack(tmp_path)
    (mlflow,) = [svc for svc in st.services() if svc.name == "mlflow"]
    mlflow_pid = st.start(mlflow)

    def deploy(pause_schedules=False):
        raise error

    monkeypatch.setattr(st, "deploy", deploy)
    try:
        with pytest.raises(type(error) if isinstance(error, KeyboardInterrupt) else stack_module.StackError) as failed:
            st.up(deploy=True)
        if not isinstance(error, KeyboardInterrupt):
            assert "deploy: injected failure" in str(failed.value)
            assert failed.value.stopped == ["prefect-worker", "prefect-server"]  # the worker starts beside deploy
        assert st.started == ["prefect-server", "prefect-worker"]
        assert _pid_files(st) == {"mlflow"} and st.pid("mlflow") == mlflow_pid
        assert not _listening(st.prefect_port) and not _listening(st.worker_health_port) and _listening(st.mlflow_port)
    finally:
        st.down()
    _assert_gone(st, {"mlflow": mlflow_pid}, {"mlflow": st.mlflow_port})


def test_up_refuses_a_port_held_by_another_program(tmp_path: Path) -> None:
    st = _fake_stack(tmp_path)
    holder = _hold_port(st.mlflow_port)
    try:
        with pytest.raises(stack_module.StackError, match=f"port {HOST}:{st.mlflow_port} is already in use"):
            st.up(deploy=False)
        assert st.started == [] and _pid_files(st) == set()
        assert holder.poll() is None
    finally:
        _stop_holder(holder)


def test_down_is_idempotent_and_spares_strangers(tmp_path: Path) -> None:
    """Stale PID files (a dead process; a PID now used by another program, e.g. after a reboot)
    are removed, the other program is not signalled, and `down` says nothing was running."""
    st = Stack(project=tmp_path, state=tmp_path / "infra", s3_port=free_port(), mlflow_port=free_port(),
               prefect_port=free_port(), worker_health_port=free_port(), external_s3=False,
               prefect_home=tmp_path / "prefect-home")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a process-group leader like the stack's services, but not a Prefect server
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        st.pid_file("mlflow").write_text(f"{dead.pid}\n")
        st.pid_file("prefect-server").write_text(f"{stranger.pid}\n")
        st.pid_file("prefect-worker").write_text("not a pid\n")
        assert st.down() == []
        assert _pid_files(st) == set()
        time.sleep(0.5)
        assert stranger.poll() is None, "down signalled a process it had not started"
        assert st.down() == []
        assert stack_module.main(["down", "--state-dir", str(st.state)]) == 0
    finally:
        stranger.kill()
        stranger.wait()


def test_a_service_started_with_sigint_ignored_still_stops_on_ctrl_c(tmp_path: Path) -> None:
    """A shell without job control (`make stack-up &`, nohup, CI runners) starts `up` with SIGINT
    ignored; the services must not inherit that, or every `stop` waits out its SIGINT steps."""
    st = _fake_stack(tmp_path)
    (mlflow,) = [svc for svc in st.services() if svc.name == "mlflow"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pid = st.start(mlflow)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        os.killpg(pid, signal.SIGINT)  # one Ctrl-C, as `stop` sends first
        deadline = time.monotonic() + 10
        while stack_module.group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not stack_module.group_alive(pid), "the service ignored SIGINT (inherited from `up`)"
    finally:
        st.down()

"""Shared test fixtures: the project root, the read-only shared data, offline env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared sits beside the checkout (the workplace layout); SHARED_DIR overrides it.
SHARED = Path(os.environ.get("CPCSAM_SHARED_DIR", ROOT.parent / "shared"))
TRASHCAN = SHARED / "data" / "trashcan"

# Telemetry off for every process the tests start. One OpenMP thread per process: `make test` runs
# a worker per core, and two spinning OpenMP threads per process stall each other on a busy
# machine (issue 13); set before anything imports torch, and inherited by every subprocess.
for key, value in {
    "OMP_NUM_THREADS": "1",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",  # else each `dvc init` of a test repository starts an analytics daemon
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}.items():
    os.environ.setdefault(key, value)


# `make test` runs the files on two xdist workers (`--dist loadfile`: a file's module and package
# fixtures, e.g. the real stack, are set up once). xdist queues files by their number of tests,
# which starts the end-to-end file (7 tests, ~8 of the suite's ~19 serial minutes) last and makes
# the run as long as it plus everything before it. These files, longest first (measured with
# --durations), are queued ahead of the rest; a file missing here only loses its head start.
LONG_FILES_FIRST = (
    "tests/orchestration/test_end_to_end.py",
    "tests/orchestration/test_stack_lifecycle.py",
    "tests/training/test_distributed.py",
    "tests/orchestration/test_retrain_reliability.py",
    "tests/orchestration/test_postgres_stack.py",
    "tests/orchestration/test_flows.py",
    "tests/orchestration/test_tracking.py",
    "tests/training/test_determinism.py",
    "tests/data/test_data_real_s3_dvc.py",
)


# The files whose tests use the orchestration folder's one stack (`stack` in
# tests/orchestration/conftest.py). xdist sets a package fixture up once per worker, so with these
# files on two workers the run brought up a second Prefect server, MLflow server and worker (about
# 40 CPU-seconds of start-up); as one work unit they share one.
SHARED_STACK_FILES = (
    "tests/orchestration/test_end_to_end.py",
    "tests/orchestration/test_flows.py",
)


def pytest_xdist_make_scheduler(config, log):
    from collections import OrderedDict

    from xdist.scheduler import LoadFileScheduling

    class LongFilesFirst(LoadFileScheduling):
        """LoadFileScheduling with LONG_FILES_FIRST moved to the head of its queue, once, before
        the first file is handed out (the queue is complete by then), and SHARED_STACK_FILES
        handed out together, as one file."""

        _reordered = False

        def _assign_work_unit(self, node):
            if not self._reordered:
                self._reordered = True
                rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
                order = sorted(self.workqueue, key=lambda scope: rank.get(scope, len(rank)))
                self.workqueue = OrderedDict((scope, self.workqueue[scope]) for scope in order)
            super()._assign_work_unit(node)

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_STACK_FILES[0] if scope in SHARED_STACK_FILES else scope

    if config.getvalue("dist") != "loadfile":
        return None  # another --dist: xdist's own scheduler
    return LongFilesFirst(config, log)


@pytest.fixture(scope="session", autouse=True)
def _stage_float_settings() -> None:
    """Subnormals flushed to zero, as `configure_process` sets every stage's process: the trainings
    the tests run in this process compute as the stages do, at the stages' speed (on Intel cores a
    training step's subnormal gradients made it some 1.4× slower)."""
    from cpcsam.training.device import flush_subnormals

    flush_subnormals()


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def trashcan_dir() -> Path:
    """The real TrashCan folder; tests that need it skip with the reason when it is absent."""
    if not (TRASHCAN / "annotations.json").is_file():
        pytest.skip(f"real data not available: {TRASHCAN} (the read-only ../shared/data folder) is absent")
    return TRASHCAN


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 endpoint: `moto_server` on 127.0.0.1, one process for the session.

    Sets the standard AWS environment (endpoint, dummy credentials, region) so that boto3,
    DVC and MLflow clients in this process and its children talk to it.
    """
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on {url}; log: {log.read_text()}")
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ENDPOINT_URL_S3": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint: str):
    """A fresh, empty bucket on the session's S3 endpoint; yields its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name

"""Secrets never reach logs, MLflow params, tags or artifacts (`cpcsam.redact` everywhere).

A real stage (`components.cli.stage_main`, in its own process) runs with AWS credentials in its
environment, a tracking URI with a database password and an S3 endpoint with credentials; its
work logs URIs, environment and a presigned URL every way a stage can. Then every byte of the
MLflow store (sqlite file and artifacts) and the stage's output are searched for the secrets.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cpcsam.redact import MASK, redact, redact_obj
from orchestration_helpers import load_stack_module

ROOT = Path(__file__).resolve().parents[2]

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAHOSTILE000000001",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY1",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789",
}
DB_PASSWORD = "DbPassw0rd!x"
S3_PASSWORD = "MinioPass123"
TRACKING_PASSWORD = "TrackPass42z"
SIGNATURE = "f00dfeedSIGNATURE"
ALL_SECRETS = [*SECRETS.values(), DB_PASSWORD, S3_PASSWORD, TRACKING_PASSWORD, SIGNATURE]

STAGE = '''
import logging, os, sys
from components.cli import stage_main
from cpcsam.errors import DataError

log = logging.getLogger("leaky_stage")

def add(parser):
    parser.add_argument("--fail", action="store_true")

def work(params, args, run):
    uri = os.environ["LEAKY_URI"]
    presigned = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAHOSTILE000000001&X-Amz-Signature=<SIGNATURE>"
    log.info("tracking %s, store %s, key %s", os.environ["MLFLOW_TRACKING_URI"], uri, os.environ["AWS_SECRET_ACCESS_KEY"])
    log.info("environment: %s", dict(os.environ))
    logging.getLogger("botocore").warning("endpoint %s", os.environ["MLFLOW_S3_ENDPOINT_URL"])
    run.log_params({"source": uri, "endpoint": os.environ["MLFLOW_S3_ENDPOINT_URL"], "presigned": presigned,
                    "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                    "cmd": "env AWS_SECRET_ACCESS_KEY=" + os.environ["AWS_SECRET_ACCESS_KEY"] + " dvc push"})
    run.set_tags({"data.source": uri, "note": "key " + os.environ["AWS_ACCESS_KEY_ID"], "db_password": "<DB_PASSWORD>"})
    run.log_dict({"env": dict(os.environ), "uri": uri, "nested": [{"token": os.environ["AWS_SESSION_TOKEN"]}]},
                 "leaky/env.json")
    if args.fail:
        raise DataError(uri + ": cannot be read")
    return "done with " + uri
sys.exit(stage_main("leaky", None, add, work))
'''.replace("<SIGNATURE>", SIGNATURE).replace("<DB_PASSWORD>", DB_PASSWORD)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def leaky(tmp_path: Path) -> dict:
    """A project folder (git repo, params.yaml with a sqlite store in it) and the stage's environment."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text(json.dumps({"tracking": {
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": str(tmp_path / "mlruns"),
        "experiment": "secrets", "retries": 1, "retry_wait_s": 0.01}}))
    (tmp_path / "stage.py").write_text(STAGE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CPCSAM_"))}
    env.update(SECRETS, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DO_NOT_TRACK="true",
               MLFLOW_DISABLE_TELEMETRY="true",
               LEAKY_URI=f"postgresql://mlflow:{DB_PASSWORD}@db.internal:5432/mlflow",
               MLFLOW_S3_ENDPOINT_URL=f"http://minio:{S3_PASSWORD}@127.0.0.1:{_closed_port()}/")
    return {"root": tmp_path, "env": env}


def _stage(leaky: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "stage.py", "--params", "params.yaml", *args], cwd=leaky["root"],
                          env={**leaky["env"], **env}, capture_output=True, text=True, timeout=300)


def _leaks(text: str) -> list[str]:
    return [s for s in ALL_SECRETS if s in text]


def test_no_secret_reaches_the_mlflow_store_or_the_log(leaky: dict) -> None:
    root = leaky["root"]
    done = _stage(leaky, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    assert done.returncode == 0, done.stderr
    failed = _stage(leaky, "--fail", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == "leaky: postgresql://mlflow:***@db.internal:5432/mlflow: cannot be read"

    for proc in (done, failed):
        assert not _leaks(proc.stdout + proc.stderr), _leaks(proc.stdout + proc.stderr)
    assert "tracking sqlite:" in done.stderr and "environment: {" in done.stderr  # the lines were logged, masked
    store = [p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts and p.name != "stage.py"]
    assert any(p.suffix == ".json" for p in store)  # the logged dict is there
    for path in store:
        data = path.read_bytes()
        assert not [s for s in ALL_SECRETS if s.encode() in data], f"secret in {path.relative_to(root)}"

    # what was logged is still there, masked (not dropped)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = next(r for r in client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
               if r.info.status == "FINISHED")
    assert run.data.params["source"] == "postgresql://mlflow:***@db.internal:5432/mlflow"
    assert run.data.params["endpoint"].startswith("http://minio:***@127.0.0.1:")
    assert run.data.params["aws_secret_access_key"] == MASK
    assert run.data.params["presigned"].endswith("X-Amz-Credential=***&X-Amz-Signature=***")
    assert run.data.params["cmd"] == "env AWS_SECRET_ACCESS_KEY=*** dvc push"
    assert run.data.tags["note"] == "key ***" and run.data.tags["db_password"] == MASK


@pytest.mark.parametrize("scheme", [
    "http",
    # MLflow retries a database it cannot reach for ~100 s (create_sqlalchemy_engine_with_retry)
    pytest.param("postgresql", marks=pytest.mark.slow),
])
def test_a_tracking_uri_with_a_password_is_masked_when_the_store_is_unreachable(leaky: dict, scheme: str) -> None:
    uri = f"{scheme}://mlflow:{TRACKING_PASSWORD}@127.0.0.1:{_closed_port()}" + ("/mlflow" if scheme != "http" else "")
    done = _stage(leaky, MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 0, done.stderr  # runs untracked
    assert f"MLflow at {uri.replace(TRACKING_PASSWORD, MASK)} unavailable" in done.stderr
    assert not _leaks(done.stdout + done.stderr), _leaks(done.stdout + done.stderr)


def test_preflight_messages_mask_passwords(monkeypatch) -> None:
    from operations.preflight import PreflightError, check_s3_endpoint, preflight

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://mlflow:{TRACKING_PASSWORD}@db/mlflow")
    with pytest.raises(PreflightError) as info:
        preflight({"tracking": {"preflight_timeout_s": 1}})
    assert "postgresql://mlflow:***@db/mlflow" in str(info.value) and TRACKING_PASSWORD not in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{TRACKING_PASSWORD}@127.0.0.1:{_closed_port()}")
    with pytest.raises(PreflightError) as info:
        preflight({"tracking": {"preflight_timeout_s": 1}})
    assert "http://admin:***@127.0.0.1:" in str(info.value) and TRACKING_PASSWORD not in str(info.value)
    with pytest.raises(PreflightError) as info:
        check_s3_endpoint(f"http://minio:{S3_PASSWORD}@127.0.0.1:{_closed_port()}", None, 1.0)
    assert "http://minio:***@127.0.0.1:" in str(info.value) and S3_PASSWORD not in str(info.value)


def test_the_stack_keeps_the_backend_password_off_the_command_line(tmp_path: Path) -> None:
    backend = f"postgresql://mlflow:{DB_PASSWORD}@127.0.0.1/mlflow"
    stack = load_stack_module().Stack(project=tmp_path, state=tmp_path / "state", mlflow_backend=backend)
    mlflow = next(s for s in stack.services() if s.name == "mlflow")
    assert DB_PASSWORD not in " ".join(mlflow.cmd)  # `ps` and the service log's header show the command
    assert mlflow.env["MLFLOW_BACKEND_STORE_URI"] == backend


@pytest.mark.parametrize("text, expected", [
    ("postgresql://user:p%40ss@db:5432/x", "postgresql://user:***@db:5432/x"),
    ("mysql+pymysql://root:hunter2@10.0.0.1/mlflow", "mysql+pymysql://root:***@10.0.0.1/mlflow"),
    ("s3 at http://AKIAHOSTILE000000001:secret@minio:9000", "s3 at http://***:***@minio:9000"),
    ("ssh://git@github.com/x.git", "ssh://git@github.com/x.git"),                    # a user name alone stays
    ("https://h/x?a=1&token=abc123&b=2", "https://h/x?a=1&token=***&b=2"),
    ("PGPASSWORD=hunter22 psql", "PGPASSWORD=*** psql"),
    ("sqlite:///mlflow.db and http://127.0.0.1:5000", "sqlite:///mlflow.db and http://127.0.0.1:5000"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_masks_secret_environment_values_and_secret_keys(monkeypatch) -> None:
    monkeypatch.setenv("MY_SERVICE_API_KEY", "k3y-value-long")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # moto's default: too short to hunt in free text
    assert redact("got k3y-value-long from the service; testing") == "got *** from the service; testing"
    assert redact_obj({"a": ["k3y-value-long"], "password": "x", "n": 1, "token_count": None}) == \
        {"a": [MASK], "password": MASK, "n": 1, "token_count": None}

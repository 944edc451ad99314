"""Session fixtures for the orchestration tests: a copy of the repository and ONE real local stack.

The stack is `infra/stack.py` itself (the code behind `make stack-up`) on free loopback ports,
run from a temporary copy of the repository, with the session's moto_server (`s3_endpoint`)
as its S3. Prefect's ephemeral mode costs 10-25 s per process, so every flow in the session
talks to this one server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestration_helpers import copy_repo, dvc, free_port, load_stack_module


@pytest.fixture(scope="session")
def repo_copy(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Path:
    """A committed copy of the repository whose DVC remote is a bucket on the session's moto_server."""
    import boto3

    dest = copy_repo(tmp_path_factory.mktemp("repo"))
    boto3.client("s3").create_bucket(Bucket="cpcsam-dvc")
    dvc(dest, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    return dest


@pytest.fixture(scope="session")
def stack(repo_copy: Path, tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str):
    """The real local stack (Prefect server + process worker + MLflow server) for the session.

    Yields the `infra.stack.Stack`; in this process, Prefect clients point at its API.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    Stack = load_stack_module().Stack

    state = tmp_path_factory.mktemp("infra")
    st = Stack(
        project=repo_copy, state=state, s3_port=0, mlflow_port=free_port(), prefect_port=free_port(),
        worker_health_port=free_port(), external_s3=True, prefect_home=state / "prefect-home",
    )
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "CPCSAM_PROJECT_DIR")}
    try:
        st.up(deploy=True, pause_schedules=True)
    except Exception:
        st.down()
        raise
    os.environ["MLFLOW_TRACKING_URI"] = st.mlflow_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: st.prefect_api}):
            yield st
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        st.down()

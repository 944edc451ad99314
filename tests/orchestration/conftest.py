"""Session fixtures for the orchestration tests: a copy of the repository and ONE real local stack.

The stack is `infra/stack.py` itself (the code behind `make stack-up`) on free loopback ports,
run from a temporary copy of the repository, with the session's moto_server (`s3_endpoint`)
as its S3. Prefect's ephemeral mode costs 10-25 s per process, so every flow in the session
talks to this one server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestration_helpers import copy_repo, dvc, free_port, load_stack_module


@pytest.fixture(scope="package")
def repo_copy(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Path:
    """A committed copy of the repository whose DVC remote is a bucket on the session's moto_server."""
    import boto3

    dest = copy_repo(tmp_path_factory.mktemp("repo"))
    boto3.client("s3").create_bucket(Bucket="cpcsam-dvc")
    dvc(dest, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    return dest


@pytest.fixture(scope="package")
def stack(repo_copy: Path, tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str):
    """The real local stack (Prefect server + process worker + MLflow server), up while the
    tests of this folder run and stopped after them, so other test folders never see it."""
    Stack = load_stack_module().Stack

    state = tmp_path_factory.mktemp("infra")
    st = Stack(
        project=repo_copy, state=state, s3_port=0, mlflow_port=free_port(), prefect_port=free_port(),
        worker_health_port=free_port(), external_s3=True, prefect_home=state / "prefect-home",
    )
    try:
        st.up(deploy=True, pause_schedules=True)
        yield st
    finally:
        st.down()


@pytest.fixture
def stack_env(stack, monkeypatch: pytest.MonkeyPatch):
    """For one test: this process's MLflow and Prefect clients point at the stack."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api}):
        yield stack


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on a free loopback port, with a password (postgres_helpers);
    skips with the reason when Debian's `postgresql` package (or psycopg2) is absent."""
    from postgres_helpers import PostgresCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with PostgresCluster() as cluster:
        yield cluster

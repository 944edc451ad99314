"""The local stack on a real PostgreSQL: `CPCSAM_STACK_DATABASE` alone moves both the MLflow
server's and the Prefect server's store from sqlite to PostgreSQL.

A throwaway PostgreSQL cluster (Debian's `postgresql` package, the `postgres` fixture; the test
skips without it) on a loopback port, a stack of its own (not the folder's sqlite one) from a
copy of the repository, one `prefect deployment run train/oceancoco`, a model registered through
`operations.registry`, and then the rows themselves, read with psycopg2: the MLflow runs and model
version in the `mlflow` database, the flow run in the `prefect` database, no sqlite file beside
them, no password in a log. The stores are under test, not the model: the deployment runs the
repository's flow over the two-stage toy DVC project of test_flows.py (the real pipeline on the
real stack: test_end_to_end.py), which costs seconds where the `tiny` pipeline cost a minute.
A fast test checks the URLs each service gets from the variable, without any server.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestration_helpers import (DVC_YAML, PARAMS, STEP, copy_repo, dvc, free_port, git, load_stack_module,
                                   register_small_champion)
from test_end_to_end import _pipeline_run, run_deployment_cli


def test_the_database_variable_alone_moves_both_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server needed: the URLs each service gets, the password kept out of command lines and
    the other services' environment, sqlite when the variable is unset, a clear error when malformed."""
    monkeypatch.delenv("CPCSAM_MLFLOW_BACKEND_URI", raising=False)
    mod = load_stack_module()
    url = "postgresql://ops:s3cr%40t-pw@127.0.0.1:6543/"
    monkeypatch.setenv("CPCSAM_STACK_DATABASE", url)
    st = mod.Stack(project=tmp_path, state=tmp_path / "state")
    svc = {s.name: s for s in st.services()}
    assert svc["mlflow"].env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://ops:s3cr%40t-pw@127.0.0.1:6543/mlflow"
    assert (svc["prefect-server"].env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
            == "postgresql+asyncpg://ops:s3cr%40t-pw@127.0.0.1:6543/prefect")
    assert st.db.admin_url == "postgresql://ops:s3cr%40t-pw@127.0.0.1:6543/postgres" and st.db.password == "s3cr@t-pw"
    assert all("s3cr" not in " ".join(s.cmd) for s in svc.values())
    assert "s3cr" not in repr(svc["prefect-worker"].env) and "CPCSAM_STACK_DATABASE" not in st._base_env()
    assert st.mask(f"connecting to {url}mlflow as ops with s3cr@t-pw") == \
        "connecting to postgresql://ops:***@127.0.0.1:6543/mlflow as ops with ***"

    monkeypatch.delenv("CPCSAM_STACK_DATABASE")
    st = mod.Stack(project=tmp_path, state=tmp_path / "state")
    svc = {s.name: s for s in st.services()}
    assert st.db is None and svc["mlflow"].env["MLFLOW_BACKEND_STORE_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in svc["prefect-server"].env

    monkeypatch.setenv("CPCSAM_STACK_DATABASE", "mysql://ops:s3cr3t-pw@db/")
    with pytest.raises(mod.StackError, match="expected postgresql://") as err:
        mod.Stack(project=tmp_path, state=tmp_path / "state")
    assert "s3cr3t" not in str(err.value)


@pytest.fixture
def pg_stack(postgres, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """The real stack (MLflow server, Prefect server + worker) with CPCSAM_STACK_DATABASE set to the
    throwaway cluster, from its own committed repository copy whose DVC project is the toy one."""
    import boto3

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    with contextlib.suppress(Exception):  # the session's moto_server may have it already
        boto3.client("s3").create_bucket(Bucket="cpcsam-dvc")
    dvc(repo, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    for name, text in (("params.yaml", PARAMS), ("dvc.yaml", DVC_YAML), ("step.py", STEP)):
        (repo / name).write_text(text)
    (repo / "dvc.lock").unlink()
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "test: the toy DVC project under the repository's flows")

    monkeypatch.setenv("CPCSAM_STACK_DATABASE", postgres.url)  # the one variable
    monkeypatch.delenv("CPCSAM_MLFLOW_BACKEND_URI", raising=False)  # it would win for MLflow
    stack_module = load_stack_module()
    state = tmp_path / "infra"
    st = stack_module.Stack(
        project=repo, state=state, s3_port=0, mlflow_port=free_port(), prefect_port=free_port(),
        worker_health_port=free_port(), external_s3=True, prefect_home=state / "prefect-home",
    )
    assert st.db is not None and st.db.mlflow_url == postgres.url + "mlflow"
    assert st.db.prefect_url == postgres.url.replace("postgresql://", "postgresql+asyncpg://") + "prefect"
    try:
        st.up(deploy=True, pause_schedules=True)
        yield st
    finally:
        st.down()


@pytest.mark.slow
def test_train_deployment_stores_in_postgresql(pg_stack, postgres, tmp_path: Path, monkeypatch) -> None:
    stack = pg_stack
    repo = stack.project
    stages = dvc(repo, "stage", "list", "--name-only").split()
    assert sorted(stages) == ["make_a", "report"]
    assert set(postgres.query("postgres", "SELECT datname FROM pg_database")) >= {("mlflow",), ("prefect",)}

    flow_run = run_deployment_cli(stack, {"profile": "toy", "overrides": ["train.steps=4"]}, timeout=600)

    # through the servers' APIs
    client = MlflowClient(stack.mlflow_url)
    parent, children = _pipeline_run(client, flow_run, experiment="toy")
    assert parent.info.status == "FINISHED"
    assert set(children) == set(stages) and all(c.info.status == "FINISHED" for c in children.values())

    # ... and in PostgreSQL's tables: MLflow's store
    run_id = parent.info.run_id
    assert postgres.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)) == [("FINISHED",)]
    (n_children,) = postgres.query(
        "mlflow", "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = %s", (run_id,))[0]
    assert n_children == len(stages)
    assert postgres.query("mlflow", "SELECT value FROM tags WHERE run_uuid = %s AND key = 'cpcsam.prefect.flow_run_id'",
                          (run_id,)) == [(flow_run,)]
    (metric,) = postgres.query("mlflow", "SELECT value FROM metrics WHERE key = 'make_a/value' AND run_uuid = %s",
                               (run_id,))
    assert metric == (4.0,), "the run's own params reached the stage"

    # the registry, through the project's registration code (the toy pipeline has no gate)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    registered = register_small_champion(tmp_path / "registry", profile="pg", tracking_uri=stack.mlflow_url)
    assert postgres.query("mlflow", "SELECT version, run_id FROM model_versions WHERE name = 'cpcsam-pg'") == [
        (int(registered["version"]), registered["run_id"])]
    assert postgres.query("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'cpcsam-pg'"
                          ) == [("champion", int(registered["version"]))]

    # Prefect's store: the flow run of the train/oceancoco deployment, completed
    rows = postgres.query(
        "prefect",
        "SELECT fr.state_type, f.name, d.name FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
        "JOIN deployment d ON d.id = fr.deployment_id WHERE fr.id = %s::uuid", (flow_run,))
    assert [(str(state), flow, deployment) for state, flow, deployment in rows] == [("COMPLETED", "train", "oceancoco")]
    (n_task_runs,) = postgres.query("prefect", "SELECT count(*) FROM task_run WHERE flow_run_id = %s::uuid",
                                    (flow_run,))[0]
    assert n_task_runs > 0

    # nothing fell back to sqlite, and the password is in no log of the stack
    assert not (stack.prefect_home / "prefect.db").exists()
    assert not (repo / "mlflow.db").exists()
    for log in (stack.state / "logs").glob("*.log"):
        assert postgres.password not in log.read_text(errors="replace"), f"the database password is in {log}"

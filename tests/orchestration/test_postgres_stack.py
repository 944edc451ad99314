"""The local stack on a real PostgreSQL: `CPCSAM_STACK_DATABASE` alone moves both the MLflow
server's and the Prefect server's store from sqlite to PostgreSQL.

A throwaway PostgreSQL cluster (Debian's `postgresql` package, the `postgres` fixture; the test
skips without it) on a loopback port, a stack of its own (not the folder's sqlite one) from a
copy of the repository, one `prefect deployment run train/oceancoco` on the `tiny` profile, and
then the rows themselves, read with psycopg2: the MLflow run and model version in the `mlflow`
database, the flow run in the `prefect` database, no sqlite file beside them, no password in a log.
A fast test checks the URLs each service gets from the variable, without any server.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestration_helpers import copy_repo, dvc, free_port, git, load_stack_module
from test_end_to_end import PASS_GATE, _pipeline_run, run_deployment_cli


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
    throwaway cluster, from its own committed repository copy with one variant (CPC-SAM)."""
    import boto3

    from flows.workspace import write_overrides

    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    with contextlib.suppress(Exception):  # the session's moto_server may have it already
        boto3.client("s3").create_bucket(Bucket="cpcsam-dvc")
    dvc(repo, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    write_overrides(repo / "params.yaml", ["variants=[cpcsam]"])  # one training stage: the stores are under test
    git(repo, "commit", "-qam", "test: one variant")

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
def test_train_deployment_stores_in_postgresql(pg_stack, postgres) -> None:
    stack = pg_stack
    repo = stack.project
    stages = dvc(repo, "stage", "list", "--name-only").split()
    assert set(postgres.query("postgres", "SELECT datname FROM pg_database")) >= {("mlflow",), ("prefect",)}

    flow_run = run_deployment_cli(stack, {"profile": "tiny", "overrides": PASS_GATE}, timeout=900)

    # through the servers' APIs
    client = MlflowClient(stack.mlflow_url)
    parent, children = _pipeline_run(client, flow_run)
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
    if "gate" in stages:
        versions = client.search_model_versions("name='cpcsam-tiny'")
        assert [v.run_id for v in versions] == [run_id]
        assert ("cpcsam-tiny",) in postgres.query("mlflow", "SELECT name FROM registered_models")
        assert postgres.query("mlflow", "SELECT version, run_id FROM model_versions WHERE name = 'cpcsam-tiny'") == [
            (int(versions[0].version), run_id)]
        assert postgres.query("mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'cpcsam-tiny'"
                              ) == [("champion", int(versions[0].version))]
    else:
        print("[pg] dvc.yaml has no gate stage yet: registry not exercised")

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

"""The `train` flow on the session's Prefect + MLflow servers, over a toy two-stage DVC project.

Mechanics only (fast): retries of a failed stage, nested MLflow runs, params restored, DVC
skipping completed stages, fail-fast preflight. The real pipeline: test_end_to_end.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from operations import tracking
from orchestration_helpers import make_toy_project

pytestmark = pytest.mark.slow


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack_env) -> Path:
    path = make_toy_project(tmp_path / "toy")
    monkeypatch.setenv("CPCSAM_PROJECT_DIR", str(path))
    return path


def _pipeline_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`cpcsam.stage` = 'pipeline'", order_by=["start_time ASC"])


def test_train_flow_retries_a_failed_stage_tracks_it_and_skips_done_work(toy: Path, stack_env) -> None:
    from flows.train import train

    client = MlflowClient(stack_env.mlflow_url)
    original = (toy / "params.yaml").read_text()
    (toy / "fail_once_make_a").touch()  # first attempt of make_a fails, Prefect retries it

    summary = train(profile="toy", overrides=["toy.value=5"])

    assert not (toy / "fail_once_make_a").exists()
    assert [(s["stage"], s["ran"]) for s in summary["stages"]] == [("make_a", True), ("report", True)]
    assert (toy / "out" / "report.txt").read_text() == "report of 5"
    assert (toy / "params.yaml").read_text() == original  # overrides were for this run only
    assert summary["gate"] is None and summary["registration"] is None  # the toy has no gate stage

    (parent,) = _pipeline_runs(client, "toy")
    assert parent.info.run_id == summary["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["cpcsam.prefect.flow_run_id"] == summary["flow_run_id"]
    assert parent.data.params["toy.value"] == "5"
    assert parent.data.metrics == {"make_a/value": 5.0, "report/length": float(len("report of 5"))}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["make_a", "report"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["cpcsam.prefect.flow_run_id"] for r in children} == {summary["flow_run_id"]}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert artifacts == {"config/params.yaml", "config/dvc.lock"}

    # Same params again: DVC runs nothing, so no stage opens a run.
    again = train(profile="toy", overrides=["toy.value=5"])
    assert [s["ran"] for s in again["stages"]] == [False, False]
    second = _pipeline_runs(client, "toy")[-1]
    assert second.info.run_id == again["mlflow_run_id"]
    assert client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{second.info.run_id}'") == []


def test_unreachable_tracking_server_fails_the_flow_before_any_stage(toy: Path, monkeypatch) -> None:
    from flows.train import train
    from orchestration_helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(tracking.PreflightError, match="is unreachable"):
        train(profile="toy")
    assert not (toy / "out").exists() and not (toy / "dvc.lock").exists()

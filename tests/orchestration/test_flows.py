"""The `train` flow on the session's Prefect + MLflow servers, over a toy two-stage DVC project.

Mechanics only (fast): retries of a failed stage, nested MLflow runs, params restored, DVC
skipping completed stages, fail-fast preflight. The real pipeline: test_end_to_end.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from operations import preflight
from orchestration_helpers import make_toy_project

pytestmark = pytest.mark.slow


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack_env) -> Path:
    path = make_toy_project(tmp_path / "toy")
    monkeypatch.setenv("CPCSAM_PROJECT_DIR", str(path))
    monkeypatch.setenv("TOY_FLAGS", str(path))
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

    summary = train(profile="toy", overrides=["train.steps=5"])

    assert not (toy / "fail_once_make_a").exists()
    assert [(s["stage"], s["ran"]) for s in summary["stages"]] == [("make_a", True), ("report", True)]
    # the run worked in its own worktree: the checkout is untouched and the worktree is gone
    assert (toy / "params.yaml").read_text() == original and not (toy / "out").exists()
    assert not Path(summary["workspace"]).exists()
    assert summary["gate"] is None and summary["registration"] is None  # the toy has no gate stage

    (parent,) = _pipeline_runs(client, "toy")
    assert parent.info.run_id == summary["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["cpcsam.prefect.flow_run_id"] == summary["flow_run_id"]
    assert parent.data.params["train.steps"] == "5"
    assert parent.data.metrics == {"make_a/value": 5.0, "report/length": float(len("report of 5"))}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["make_a", "report"]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["cpcsam.prefect.flow_run_id"] for r in children} == {summary["flow_run_id"]}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    assert artifacts == {"config/params.yaml", "config/dvc.lock"}

    # Same params again: DVC runs nothing, so no stage opens a run.
    again = train(profile="toy", overrides=["train.steps=5"])
    assert [s["ran"] for s in again["stages"]] == [False, False]  # restored from the shared run cache
    second = _pipeline_runs(client, "toy")[-1]
    assert second.info.run_id == again["mlflow_run_id"]
    assert client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{second.info.run_id}'") == []


def test_unreachable_tracking_server_fails_the_flow_before_any_stage(toy: Path, monkeypatch) -> None:
    from flows.train import train
    from orchestration_helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(preflight.PreflightError, match="is unreachable"):
        train(profile="toy")
    assert not (toy / "out").exists() and not (toy / "dvc.lock").exists() and not (toy / ".workspaces").exists()


def test_two_runs_of_different_profiles_at_once_do_not_interfere(toy: Path, stack_env) -> None:
    """Two flow runs at the same time on one worker: each in its own worktree, each with its own params."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from flows.train import train

    from flows.workspace import write_overrides
    from orchestration_helpers import git

    write_overrides(toy / "params.yaml", ["data.profiles.other={source: synthetic, num_images: 8}"])
    git(toy, "commit", "-qam", "a second profile")
    client = MlflowClient(stack_env.mlflow_url)
    with ThreadPoolExecutor(2) as pool:
        # Each thread runs in a copy of this context, where `stack_env` points Prefect at the stack's
        # server: a bare thread would not see that setting and would start Prefect's temporary server.
        runs = [pool.submit(contextvars.copy_context().run, train, profile=p, overrides=[f"train.steps={v}"])
                for p, v in (("toy", 7), ("other", 9))]
        summaries = [r.result(timeout=600) for r in runs]
    assert summaries[0]["workspace"] != summaries[1]["workspace"]
    for summary, value in zip(summaries, (7, 9)):
        run = client.get_run(summary["mlflow_run_id"])
        assert run.data.metrics["make_a/value"] == float(value), "each run read its own params"
        assert run.data.params["data.profile"] == summary["profile"]
    assert not (toy / "out").exists()

"""operations.tracking against a real MLflow sqlite store in tmp_path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from operations import tracking
from operations.preflight import PreflightError, preflight
from operations.tracking import pipeline_run, stage_run


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Params pointing at a fresh sqlite store; cwd is tmp_path (a git repo with a dvc.lock)."""
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", tracking.PARENT_RUN_ENV, tracking.TRACKING_SWITCH_ENV, tracking.FLOW_RUN_ENV):
        monkeypatch.delenv(key, raising=False)
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    outs:\n    - path: data/ingest/manifest.parquet\n      md5: abc123\n"
    )
    subprocess.run(["git", "add", "dvc.lock"], check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], check=True
    )
    return {
        "seed": 7,
        "data": {"profile": "tiny"},
        "train": {"lr": 0.01, "schedule": {"steps": 3}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "unit", "retry_wait_s": 0.01},
    }


def _runs(params: dict):
    client = tracking.make_client(params)
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_stages_nest_under_the_pipeline_run_with_lineage_tags(store: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(tracking.FLOW_RUN_ENV, "flow-run-42")
    (tmp_path / "curve.csv").write_text("step,loss\n1,0.5\n")
    with pipeline_run(store, run_name="pipeline") as parent:
        assert os.environ[tracking.PARENT_RUN_ENV] == parent.run_id
        with stage_run("train", store) as run:
            run.log_metrics({"loss": 0.5}, step=1)
            run.log_metrics({"loss": 0.25}, step=2)
            run.log_artifact(tmp_path / "curve.csv", "curves")
            run.log_dict({"passed": True}, "gate.json")
            run.set_tags({"note": "x"})
    assert tracking.PARENT_RUN_ENV not in os.environ

    client, runs = _runs(store)
    parent_run, child = runs["pipeline"], runs["train"]
    assert child.data.tags["mlflow.parentRunId"] == parent_run.info.run_id
    assert child.info.status == parent_run.info.status == "FINISHED"
    # the stage's own params: seed + its section, flattened
    assert child.data.params == {"seed": "7", "train.lr": "0.01", "train.schedule.steps": "3"}
    history = client.get_metric_history(child.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    # mirrored on the pipeline run so runs compare side by side
    assert parent_run.data.metrics["train/loss"] == 0.25
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for run in (parent_run, child):
        tags = run.data.tags
        assert tags["cpcsam.git.commit"] == commit
        assert tags["cpcsam.git.dirty"] == "false"
        assert len(tags["cpcsam.dvc.lock_md5"]) == 32
        assert "manifest.parquet:abc123" in tags["cpcsam.dvc.data_outs"]
        assert tags["cpcsam.prefect.flow_run_id"] == "flow-run-42"
    assert child.data.tags["cpcsam.profile"] == "tiny"
    assert child.data.tags["note"] == "x"
    listed = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert listed == {"curves", "gate.json"}


def test_without_a_parent_a_stage_makes_its_own_run(store: dict, tmp_path: Path) -> None:
    (tmp_path / "extra.txt").write_text("dirty")
    subprocess.run(["git", "add", "extra.txt"], check=True)  # staged change: dirty
    with stage_run("ingest", store) as run:
        run.log_metrics({"n_images": 3})
    _, runs = _runs(store)
    assert set(runs) == {"ingest"}
    assert "mlflow.parentRunId" not in runs["ingest"].data.tags
    assert runs["ingest"].data.tags["cpcsam.git.dirty"] == "true"
    assert runs["ingest"].data.metrics == {"n_images": 3.0}


def test_a_failing_stage_closes_its_run_failed(store: dict) -> None:
    with pytest.raises(RuntimeError):
        with stage_run("train", store):
            raise RuntimeError("boom")
    _, runs = _runs(store)
    assert runs["train"].info.status == "FAILED"


@pytest.mark.parametrize("how", ["params", "env"])
def test_tracking_off_is_a_noop(store: dict, tmp_path: Path, monkeypatch, how: str) -> None:
    if how == "params":
        store["tracking"]["enabled"] = False
    else:
        monkeypatch.setenv(tracking.TRACKING_SWITCH_ENV, "off")
    with stage_run("train", store) as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_params({"a": 1})
        run.log_artifact(tmp_path / "missing.bin")
        assert run.run_id is None
    assert not (tmp_path / "mlflow.db").exists()


class FlakyClient:
    """A real MlflowClient whose log_batch fails the first `failures` calls (isolates retry logic)."""

    def __init__(self, client, failures: int) -> None:
        self._client, self.failures, self.calls = client, failures, 0

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("tracking server went away")
        return self._client.log_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_logging_is_retried_then_downgraded_to_a_warning(store: dict, tmp_path: Path, caplog) -> None:
    with stage_run("train", store) as run:
        run.client = flaky = FlakyClient(run.client, failures=2)
        run.log_metrics({"loss": 0.5}, step=0)  # fails twice, third attempt lands
        assert flaky.calls == 3 and run.failures == 0
        flaky.failures = 10**6  # now the server is gone for good
        artifact = tmp_path / "model.pt"
        artifact.write_bytes(b"weights")  # what the stage produced stays on disk
        for step in range(1, 8):
            run.log_metrics({"loss": 0.1}, step=step)  # must not raise
        assert run.failures == run.max_consecutive_failures  # then it stops trying
        calls_after_giving_up = flaky.calls
        run.log_metrics({"loss": 0.0}, step=9)
        assert flaky.calls == calls_after_giving_up
    assert artifact.read_bytes() == b"weights"
    assert "continuing without it" in caplog.text
    client, runs = _runs(store)
    assert [m.value for m in client.get_metric_history(runs["train"].info.run_id, "loss")] == [0.5]
    assert runs["train"].info.status == "FINISHED"


def test_an_unreachable_store_at_stage_start_runs_the_stage_untracked(store: dict, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store["tracking"]["retries"] = 1
    with stage_run("train", store) as run:
        run.log_metrics({"loss": 1.0})
        assert run.run_id is None


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_preflight_fails_fast_on_an_unreachable_tracking_server(store: dict, monkeypatch) -> None:
    import time

    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    start = time.monotonic()
    with pytest.raises(PreflightError, match=rf"MLflow tracking server {url} is unreachable.*Nothing was trained"):
        preflight(store)
    assert time.monotonic() - start < 5


def test_a_database_store_that_is_down_is_known_in_milliseconds(store: dict, monkeypatch) -> None:
    """MLflow alone retries a dead database for ~100 s; a TCP probe says so at once."""
    import socket
    import time

    down = f"postgresql+psycopg2://mlflow:pw@127.0.0.1:{_closed_port()}/mlflow"
    start = time.monotonic()
    assert "127.0.0.1" in tracking.database_problem(down, 2.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    with pytest.raises(PreflightError, match=r"its database does not answer.*Nothing was trained"):
        preflight(store)
    assert time.monotonic() - start < 5
    with socket.socket() as listening:  # something answers on the port: the probe lets MLflow try
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        up = f"postgresql://mlflow:pw@127.0.0.1:{listening.getsockname()[1]}/mlflow"
        assert tracking.database_problem(up, 2.0) is None
    assert tracking.database_problem("sqlite:///mlflow.db", 2.0) is None
    assert tracking.database_problem("postgresql:///mlflow?host=/var/run/postgresql", 2.0) is None  # a Unix socket


def test_preflight_fails_fast_on_an_unreachable_s3_endpoint(store: dict) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(PreflightError, match=rf"S3 endpoint {url} is unreachable"):
        preflight(store, s3_endpoints=[(url, "bucket")])


def test_preflight_passes_on_a_live_s3_bucket_and_names_a_missing_one(store: dict, s3_endpoint: str, s3_bucket: str) -> None:
    done = preflight(store, s3_endpoints=[(s3_endpoint, s3_bucket)])
    assert done[0].startswith("tracking store sqlite:///") and s3_bucket in done[-1]
    with pytest.raises(PreflightError, match="s3://no-such-bucket"):
        preflight(store, s3_endpoints=[(s3_endpoint, "no-such-bucket")])


def test_names_mlflow_rejects_are_made_legal_instead_of_losing_the_batch(store: dict) -> None:
    store["perturb"] = {"kinds": {"box": 0.4, "box+points": 0.3}}
    with stage_run("perturb", store) as run:
        run.log_metrics({"dice@box+points": 0.5})
        assert run.failures == 0
    _, runs = _runs(store)
    assert runs["perturb"].data.params["perturb.kinds.box_points"] == "0.3"
    assert runs["perturb"].data.metrics == {"dice_box_points": 0.5}


@pytest.mark.slow
def test_a_tracking_server_lost_mid_stage_costs_seconds_and_nothing_on_disk(store: dict, tmp_path: Path, monkeypatch) -> None:
    """A real MLflow server (infra/stack.py's) stops while a stage runs: the stage finishes, its
    outputs are on disk, what was logged before the loss is kept.

    MLflow's own HTTP retries are off here (`MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`): our retry loop
    and its give-up are under test, not urllib3's back-off, which with the defaults of
    `operations.tracking` makes the same loss cost ~18 s instead of a fraction of one."""
    import time

    from orchestration_helpers import free_port, load_stack_module

    st = load_stack_module().Stack(project=tmp_path, state=tmp_path / "infra", mlflow_port=free_port(),
                                   external_s3=True)
    (mlflow_service,) = [s for s in st.services() if s.name == "mlflow"]
    st.start(mlflow_service)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", st.mlflow_url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        preflight(store)  # the server answers at the start
        with stage_run("train", store) as run:
            run.log_metrics({"loss": 1.0}, step=0)
            assert run.failures == 0
            st.stop("mlflow")
            start = time.monotonic()
            model = tmp_path / "model.pt"
            for step in range(1, 20):  # training goes on; each step logs
                model.write_bytes(f"weights after step {step}".encode())
                run.log_metrics({"loss": 1.0 / step}, step=step)
            run.log_artifact(model)
            lost_for = time.monotonic() - start
            assert run.failures == run.max_consecutive_failures  # then it stopped trying
        assert model.read_bytes() == b"weights after step 19"
        # retries for the first failed call (`store` waits 0.01 s between them), then one attempt per
        # call until the 5th consecutive failure: connection refused costs milliseconds each
        assert lost_for < 10, f"a lost server slowed the stage by {lost_for:.0f} s"
        print(f"[tracking] server lost mid-stage: {lost_for:.1f} s of failed logging, then logging stopped")
    finally:
        st.stop("mlflow")
    with pytest.raises(PreflightError):  # the next pipeline run would not even start
        preflight(store)
    # what was logged before the loss is in the store
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert [m.value for m in client.get_metric_history(logged.info.run_id, "loss")] == [1.0]


def test_stages_opening_a_new_sqlite_store_together_all_track(tmp_path: Path) -> None:
    """`make run` on a fresh clone starts two stages at once, and each opens the new database.
    MLflow creates and migrates it in whichever process opens it first; two at a time used to
    leave it half-migrated for good, and every later stage then ran untracked."""
    import sys
    import textwrap
    import time

    root = Path(__file__).resolve().parents[2]
    database = tmp_path / "store" / "mlflow.db"
    go = tmp_path / "go"
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        import mlflow  # imported before the start line: the processes then open the store together
        from operations.tracking import make_client
        database, go, name = sys.argv[1:]
        Path(go + "." + name).touch()
        while not Path(go).exists():
            time.sleep(0.002)
        make_client(uri=f"sqlite:///{database}").create_experiment(name)
    """)
    env = {**os.environ, "PYTHONPATH": str(root)}
    names = [f"stage{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(database), str(go), name], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{go}.{name}").exists() for name in names):
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
            assert time.monotonic() < deadline, "the processes did not start"
            time.sleep(0.01)
        go.touch()
        errors = [err[-2000:] for p in procs if (err := p.communicate(timeout=120)[1]) and p.returncode != 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not errors, errors
    client = tracking.make_client(uri=f"sqlite:///{database}")
    assert sorted(e.name for e in client.search_experiments() if e.name != "Default") == names

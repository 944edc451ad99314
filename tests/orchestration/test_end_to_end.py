"""End to end on the real stack: `prefect deployment run train/oceancoco` on the `tiny` profile,
the MLflow run and registry it leaves, the retrain flow on new S3 objects, `dvc push`/`pull`.

Everything runs for real in a temporary copy of the repository: the Prefect server and process
worker, the MLflow tracking server, moto_server as S3. The stages are whatever `dvc.yaml`
holds; while the graph is incomplete (a stage depends on a file no stage produces yet), the
copy drops those stages and everything downstream, and the test says so on stdout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from orchestration_helpers import dvc, git, prefect_read

pytestmark = pytest.mark.slow

GATE = "artifacts/eval/gate.json"
# A few optimisation steps and a light evaluation: the orchestration is under test, not the model.
FAST = [
    "pretrain.steps=3", "pretrain.log_every=1", "pretrain.batch_images=2",
    "train.steps=3", "train.log_every=1", "train.checkpoint_every=2", "train.batch_images=1",
    "evaluate.sigmas=[0.0, 0.2]", "evaluate.kinds=[box]", "evaluate.max_images=4", "evaluate.tta.k=1",
    "evaluate.overlays=1", "evaluate.auto.enabled=false", "evaluate.references=false", "export.parity_images=2",
]
# Gate thresholds that make the verdict certain either way (Dice lies in [0, 1]).
PASS_GATE = [*FAST, "gate.min_target_dice=0.0", "gate.max_base_regression=1.0", "gate.beat_reference=null"]
FAIL_GATE = [*FAST, "gate.min_target_dice=1.01"]


@pytest.fixture(scope="module")
def pipeline(repo_copy: Path, stack) -> dict:
    """The repository copy with two variants (CPC-SAM and LoRA-only), committed: a flow runs a commit."""
    from flows.workspace import write_overrides

    write_overrides(repo_copy / "params.yaml", ["variants=[cpcsam, lora_only]"])
    git(repo_copy, "commit", "-qam", "test: two variants")
    stages = dvc(repo_copy, "stage", "list", "--name-only").split()
    print(f"\n[e2e] stages run: {stages}")
    return {"repo": repo_copy, "stages": stages, "has_gate": "gate" in stages}


def run_deployment_cli(stack, parameters: dict, timeout: int = 1200, deployment: str = "train/oceancoco") -> str:
    """`prefect deployment run <deployment> --params ... --watch`; returns the flow-run id."""
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**os.environ, **stack.client_env(), "PREFECT_HOME": str(stack.prefect_home)}
    proc = subprocess.run(
        [prefect, "deployment", "run", deployment, "--params", json.dumps(parameters), "--watch",
         "--watch-timeout", str(timeout)],
        cwd=stack.project, env=env, capture_output=True, text=True, timeout=timeout + 60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Completed" in out, f"deployment run failed:\n{out[-4000:]}\n" + _worker_log(stack)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def _worker_log(stack) -> str:
    log = stack.log_file("prefect-worker")
    return log.read_text()[-6000:] if log.exists() else ""


def _pipeline_run(client: MlflowClient, flow_run_id: str, experiment: str = "cpcsam"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`cpcsam.prefect.flow_run_id` = '{flow_run_id}' and tags.`cpcsam.stage` = 'pipeline'"
    )
    assert len(runs) == 1, f"expected one pipeline run for flow run {flow_run_id}, found {len(runs)}"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'")
    return runs[0], {c.info.run_name: c for c in children}


def test_train_deployment_tracks_registers_and_gates(pipeline: dict, stack) -> None:
    repo, stages = pipeline["repo"], pipeline["stages"]
    client = MlflowClient(stack.mlflow_url)
    committed_params = (repo / "params.yaml").read_text()

    flow_run = run_deployment_cli(stack, {"profile": "tiny", "overrides": PASS_GATE})

    parent, children = _pipeline_run(client, flow_run)
    assert parent.info.status == "FINISHED"
    assert set(children) == set(stages), "every stage ran once, as a nested run"
    assert all(c.info.status == "FINISHED" for c in children.values())
    tags = parent.data.tags
    assert tags["cpcsam.profile"] == "tiny"
    assert tags["cpcsam.git.commit"] == git(repo, "rev-parse", "HEAD").strip()
    with tempfile.TemporaryDirectory() as tmp:  # the run's own dvc.lock (its worktree's), logged on the run
        lock = Path(client.download_artifacts(parent.info.run_id, "config/dvc.lock", tmp)).read_bytes()
    assert tags["cpcsam.dvc.lock_md5"] == hashlib.md5(lock).hexdigest()
    assert "cpcsam.dvc.data_md5" in tags
    assert parent.data.params["data.profile"] == "tiny"
    # per-stage metrics mirrored on the pipeline run
    assert any(k.startswith("ingest/") for k in parent.data.metrics)
    assert any(k.startswith("validate/") for k in parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config", "reports", "summary.json"} <= artifacts
    assert (repo / "params.yaml").read_text() == committed_params  # the run's overrides are gone again

    assert not (repo / "data").exists() and not (repo / "artifacts").exists(), "the run worked in its own worktree"
    if "train@cpcsam" in stages:
        train_run = children["train@cpcsam"]
        steps = {k: len(client.get_metric_history(train_run.info.run_id, k)) for k in train_run.data.metrics}
        assert max(steps.values()) > 1, f"training logs per-step metrics: {steps}"
    if "evaluate" in stages:
        reports = {a.path for a in client.list_artifacts(parent.info.run_id, "reports/artifacts/eval")}
        assert "reports/artifacts/eval/table.md" in reports and "reports/artifacts/eval/plots" in reports

    if not pipeline["has_gate"]:
        print("[e2e] dvc.yaml has no gate stage yet: registry not exercised")
        flow_run = run_deployment_cli(stack, {"profile": "tiny", "overrides": PASS_GATE})
        assert _pipeline_run(client, flow_run)[1] == {}, "a second run with the same params re-runs nothing"
        return

    # gate passed -> version 1 is the champion, with the ONNX model and the gate on the run
    with tempfile.TemporaryDirectory() as tmp:
        gate = json.loads(Path(client.download_artifacts(parent.info.run_id, f"reports/{GATE}", tmp)).read_text())
    assert gate["passed"] is True, gate
    versions = client.search_model_versions("name='cpcsam-tiny'")
    assert [v.run_id for v in versions] == [parent.info.run_id]
    assert str(client.get_model_version_by_alias("cpcsam-tiny", "champion").version) == str(versions[0].version)
    model_files = {a.path for a in client.list_logged_model_artifacts(versions[0].tags["cpcsam.model_id"], "artifacts/export")}
    assert {"artifacts/export/decoder_capl.onnx", "artifacts/export/image_encoder.onnx"} <= model_files
    assert client.get_run(parent.info.run_id).data.metrics["gate/passed"] == 1.0

    # gate set to fail -> a rejected version with its reasons; the champion stays
    flow_run = run_deployment_cli(stack, {"profile": "tiny", "overrides": FAIL_GATE})
    parent2, children2 = _pipeline_run(client, flow_run)
    assert set(children2) == {"gate"}, f"DVC re-ran done stages (or skipped the gate): {set(children2)}"
    (rejected,) = [v for v in client.search_model_versions("name='cpcsam-tiny'") if v.run_id == parent2.info.run_id]
    assert rejected.tags["cpcsam.verdict"] == "rejected"
    assert "FAIL min_target_dice" in rejected.tags["cpcsam.gate.reasons"]
    champion = client.get_model_version_by_alias("cpcsam-tiny", "champion")
    assert champion.run_id == parent.info.run_id, "a rejected model must not move the champion"
    print(f"[e2e] registry: champion v{champion.version}, rejected v{rejected.version}")


def _synthetic_coco_batch(workdir: Path, tiny_profile: dict) -> tuple[Path, int]:
    """A deep-sea batch in COCO layout from the data layer's synthetic generator, plus two bad items."""
    from cpcsam.data.records import Quarantine
    from cpcsam.data.sources.synthetic import SyntheticSource

    cfg = {k: v for k, v in tiny_profile.items() if k not in ("split", "roles", "source")}
    batch = workdir / "batch"
    source = SyntheticSource({**cfg, "seed": 11}, batch / "images")
    records = list(source.records(Quarantine()))
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(source.classes())]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for i, rec in enumerate(records, start=1):
        images.append({"id": i, "file_name": Path(rec.image_uri).name, "width": rec.width, "height": rec.height})
        for ent in rec.entities:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat_id[ent.class_name],
                                "segmentation": {"size": [rec.height, rec.width], "counts": ent.rle_counts},
                                "area": ent.area, "bbox": list(ent.bbox), "iscrowd": 0})
    # bad sample 1: a truncated image (it and its annotation are quarantined)
    good = (batch / "images" / images[0]["file_name"]).read_bytes()
    (batch / "images" / "dive9999_frame00.png").write_bytes(good[: len(good) // 3])
    images.append({"id": 9999, "file_name": "dive9999_frame00.png", "width": images[0]["width"],
                   "height": images[0]["height"]})
    annotations.append({**annotations[0], "id": 99_999, "image_id": 9999})
    # bad sample 2: an annotation of an unknown category
    annotations.append({**annotations[1], "id": 99_998, "category_id": 404})
    (batch / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                        "categories": categories}))
    return batch, len(records)


def _upload(folder: Path, bucket: str, prefix: str) -> int:
    import boto3

    client = boto3.client("s3")
    files = [p for p in folder.rglob("*") if p.is_file()]
    for path in files:
        client.upload_file(str(path), bucket, f"{prefix}{path.relative_to(folder).as_posix()}")
    return len(files)


def test_retrain_picks_up_new_s3_data_once(pipeline: dict, stack_env, tmp_path: Path, monkeypatch) -> None:
    import boto3

    from flows.retrain import retrain

    repo = pipeline["repo"]
    monkeypatch.setenv("CPCSAM_PROJECT_DIR", str(repo))
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="cpcsam-incoming")
    tiny = yaml.safe_load((repo / "params.yaml").read_text())["data"]["profiles"]["tiny"]
    batch, n_good = _synthetic_coco_batch(tmp_path, tiny)
    n_objects = _upload(batch, "cpcsam-incoming", "deepsea/batch-001/")
    extra = {k: tiny[k] for k in ("split", "roles") if k in tiny}

    kwargs = dict(bucket="cpcsam-incoming", prefix="deepsea/", profile_extra=extra,
                  train_overrides=[*PASS_GATE, "variants=[cpcsam]"],  # the data path is under test
                  push=True, wait_timeout_s=1200)
    first = retrain(**kwargs)

    assert first["new_objects"] == n_objects
    (report,) = first["batches"]
    assert report["images_accepted"] == n_good
    assert report["reasons"] == {"truncated_image": 1, "unknown_class": 1}
    coco = json.loads((repo / "datasets/deepsea/annotations.json").read_text())
    assert len(coco["images"]) == n_good and all(i["file_name"].startswith("batch-001/") for i in coco["images"])
    assert json.loads((repo / "datasets/deepsea/quarantine/batch-001.json").read_text())["n_quarantined"] == 2
    version = yaml.safe_load((repo / "datasets/deepsea.dvc").read_text())["outs"][0]["md5"]
    assert first["data_version"] == version
    remote_keys = [o["Key"] for o in s3.list_objects_v2(Bucket="cpcsam-dvc").get("Contents", [])]
    assert any(version.replace(".dir", "")[2:] in k for k in remote_keys), "the dataset version is on the DVC remote"

    assert first["triggered"] and first["train_state"] == "COMPLETED"
    outcome = first["outcome"]
    assert outcome is not None and outcome["mlflow_run_id"]
    run = MlflowClient(stack_env.mlflow_url).get_run(outcome["mlflow_run_id"])
    assert run.data.params["data.profiles.oceancoco.data_version"] == version
    assert run.data.params["data.profiles.oceancoco.root"] == str(repo / "datasets/deepsea")  # absolute: runs use worktrees
    if pipeline["has_gate"]:
        assert outcome["registration"]["model_name"] == "cpcsam-oceancoco"
        assert outcome["registration"]["promoted"] is True

    state = repo / "datasets/deepsea.state.json"
    before = state.read_text()
    second = retrain(**kwargs)
    assert second["new_objects"] == 0 and second["batches"] == [] and not second["triggered"]
    assert state.read_text() == before


def _predict_runs() -> list:
    """Flow runs of the predict/deepsea deployment, oldest first (the stack's API: `stack_env`)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName

    runs = prefect_read(lambda client: client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=["predict"])),
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["deepsea"]))))
    return sorted(runs, key=lambda r: r.created)


def test_a_promotion_triggers_batch_inference_which_skips_done_images(pipeline: dict, stack, stack_env,
                                                                      tmp_path: Path) -> None:
    """After the retrain test promoted cpcsam-oceancoco, the `cpcsam.champion.promoted` event started
    predict/deepsea (its deployment trigger); a dive uploaded then is predicted once."""
    import time

    import boto3

    if not pipeline["has_gate"]:
        pytest.skip("no gate stage in dvc.yaml: nothing is promoted")
    deadline = time.monotonic() + 180
    while not (runs := [r for r in _predict_runs() if r.state and r.state.is_final()]):
        assert time.monotonic() < deadline, "no predict/deepsea run followed the promotion event"
        time.sleep(3)
    assert runs[0].state.is_completed(), f"the triggered predict run ended {runs[0].state}"
    assert runs[0].created_by is None or runs[0].created_by.type == "AUTOMATION"

    s3 = boto3.client("s3")
    bucket = "cpcsam-incoming"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    prompts = {}
    for name in ("a.jpg", "b.jpg"):
        pixels = rng.integers(0, 255, (120, 160, 3), dtype="uint8")
        Image.fromarray(pixels).save(tmp_path / name, quality=90)
        s3.upload_file(str(tmp_path / name), bucket, f"dives/dive-e2e/images/{name}")
        prompts[name] = [{"class": "object", "box": [20, 20, 100, 90]}]
    s3.put_object(Bucket=bucket, Key="dives/dive-e2e/prompts.json", Body=json.dumps(prompts).encode())

    run_deployment_cli(stack, {}, timeout=600, deployment="predict/deepsea")
    version = MlflowClient(stack.mlflow_url).get_model_version_by_alias("cpcsam-oceancoco", "champion").version
    out = f"predictions/cpcsam-oceancoco/v{version}/dive-e2e/"
    coco = json.loads(s3.get_object(Bucket=bucket, Key=out + "predictions.json")["Body"].read())
    assert sorted(im["file_name"] for im in coco["images"]) == ["a.jpg", "b.jpg"] and len(coco["annotations"]) == 2
    state_etag = s3.head_object(Bucket=bucket, Key=out + "processed.json")["ETag"]

    run_deployment_cli(stack, {}, timeout=600, deployment="predict/deepsea")  # nothing new: nothing rewritten
    assert s3.head_object(Bucket=bucket, Key=out + "processed.json")["ETag"] == state_etag


def _flow_run(flow_run_id: str):
    return prefect_read(lambda client: client.read_flow_run(flow_run_id))


# CPC-SAM alone (the stage under test, not the other variants), long enough to be caught mid-training.
LONG_TRAIN = [*FAST, "variants=[cpcsam]", "train.steps=40", "train.seed=17"]


def _model_md5(client: MlflowClient, run_id: str) -> str:
    """md5 of train@cpcsam's model.pt as recorded in the dvc.lock a pipeline run logged."""
    with tempfile.TemporaryDirectory() as tmp:
        lock = yaml.safe_load(Path(client.download_artifacts(run_id, "config/dvc.lock", tmp)).read_text())
    return {o["path"]: o["md5"] for o in lock["stages"]["train@cpcsam"]["outs"]}["artifacts/train/cpcsam/model.pt"]


@pytest.fixture(scope="module")
def restarted_run(pipeline: dict, stack) -> dict:
    """A train/oceancoco run (LONG_TRAIN) during which the Prefect server is stopped and started
    again while a stage runs. {"flow_run_id", "state"} once the run has ended.

    The restart never touches the stage processes (DVC subprocesses of the flow), so the run is also
    the uninterrupted reference of the resume test below, which so trains nothing of its own to
    compare with."""
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**os.environ, **stack.client_env(), "PREFECT_HOME": str(stack.prefect_home)}
    proc = subprocess.run(
        [prefect, "deployment", "run", "train/oceancoco", "--params",
         json.dumps({"profile": "tiny", "overrides": LONG_TRAIN})],
        cwd=stack.project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout + proc.stderr).group(1)

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api}):
        deadline = time.monotonic() + 300
        while _flow_run(flow_run_id).state.type.value != "RUNNING":
            assert time.monotonic() < deadline, "the flow run never started"
            time.sleep(2)
        time.sleep(8)  # inside the DVC stages
        assert stack.stop("prefect-server"), "could not stop the Prefect server"
        time.sleep(5)
        stack.up(deploy=False)  # starts what is not running: the server again, on the same port and database

        deadline = time.monotonic() + 900
        while not (state := _flow_run(flow_run_id).state).is_final():
            assert time.monotonic() < deadline, f"the flow run did not end after the restart ({state.type})"
            time.sleep(3)
    return {"flow_run_id": flow_run_id, "state": state}


def test_a_flow_run_survives_a_prefect_server_restart(restarted_run: dict, stack) -> None:
    """The flow process keeps working through the restart (its stage is a DVC subprocess), its API
    calls retry until the server is back, and the run completes; the state it reports is in the
    server's database."""
    state = restarted_run["state"]
    assert state.is_completed(), f"flow run ended {state.type}: {state.message}\n" + _worker_log(stack)


def _kill_flow_processes(stack) -> int:
    """SIGKILL the worker's process group and every process of a flow run (the Prefect engine
    subprocess, DVC and the stage, whose working folder is the run's worktree). Returns how many."""
    import signal

    killed = 0
    worker = stack.pid("prefect-worker")
    if worker:
        os.killpg(worker, signal.SIGKILL)
        killed += 1
    workspaces = str(stack.project / ".workspaces")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(workspaces) or ("prefect" in cmd and "engine" in cmd and cwd == str(stack.project)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed


def test_a_worker_killed_during_train_resumes_in_the_next_run_to_the_same_weights(
        restarted_run: dict, pipeline: dict, stack, stack_env) -> None:
    """The worker and its flow run are SIGKILLed while `train@cpcsam` runs; the next deployment run
    resumes from the checkpoints the killed run left (`.workspaces/.checkpoints/train-tiny-<key>`)
    and its model.pt equals, byte for byte, the one of the uninterrupted run of the same params
    (`restarted_run`). Only the checkpoint interval differs, which makes DVC train the stage again
    (it is a param) and must not change a weight."""
    import time

    overrides = [*LONG_TRAIN, "train.checkpoint_every=5"]
    shared = stack.project / ".workspaces" / ".checkpoints"
    before = set(shared.rglob("step_*.pt"))  # earlier runs' checkpoints (other overrides, other folders)
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**os.environ, **stack.client_env(), "PREFECT_HOME": str(stack.prefect_home)}
    proc = subprocess.run(
        [prefect, "deployment", "run", "train/oceancoco", "--params",
         json.dumps({"profile": "tiny", "overrides": overrides})],
        cwd=stack.project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadline = time.monotonic() + 600
    while not (new := [p for p in shared.rglob("step_*.pt") if p not in before and p.parent.name == "cpcsam"]):
        assert time.monotonic() < deadline, "train@cpcsam wrote no checkpoint"
        time.sleep(0.5)
    assert _kill_flow_processes(stack) >= 2, "the flow run's processes were not found"
    left = sorted(p.name for p in new[0].parent.glob("step_*.pt"))
    stack.up(deploy=False)  # a new worker

    flow_run = run_deployment_cli(stack, {"profile": "tiny", "overrides": overrides})
    client = MlflowClient(stack.mlflow_url)
    parent, children = _pipeline_run(client, flow_run)
    train_run = children["train@cpcsam"]
    key = sorted(train_run.data.metrics)[0]
    first_step = min(m.step for m in client.get_metric_history(train_run.info.run_id, key))
    assert first_step > 1, f"the next run trained from step {first_step}: it did not resume ({left})"

    assert restarted_run["state"].is_completed(), "the uninterrupted reference run failed"
    expected = _model_md5(client, _pipeline_run(client, restarted_run["flow_run_id"])[0].info.run_id)
    assert _model_md5(client, parent.info.run_id) == expected, f"resumed after {left[-1]}: other weights"


def test_dvc_push_then_pull_restores_the_outputs(pipeline: dict, s3_endpoint: str) -> None:
    import boto3

    from flows.workspace import write_overrides

    repo = pipeline["repo"]
    params = repo / "params.yaml"
    committed = params.read_text()
    # In the checkout itself (flow runs worked in their own worktrees), on the profile the flow runs
    # used: DVC restores both stages from the run cache they left, instead of ingesting the default.
    write_overrides(params, ["data.profile=tiny"])
    try:
        assert "Running stage" not in dvc(repo, "repro", "validate"), "the flow runs' run cache was not used"
        manifest = repo / "data/ingest/manifest.parquet"
        digest = hashlib.md5(manifest.read_bytes()).hexdigest()
        dvc(repo, "push", "ingest", "validate")
        assert boto3.client("s3").list_objects_v2(Bucket="cpcsam-dvc").get("KeyCount", 0) > 0
        shutil.rmtree(repo / ".dvc" / "cache")
        shutil.rmtree(repo / "data" / "ingest")
        dvc(repo, "pull", "ingest", "validate")
        assert hashlib.md5(manifest.read_bytes()).hexdigest() == digest
        assert "up to date" in dvc(repo, "status", "validate")
    finally:
        params.write_text(committed)

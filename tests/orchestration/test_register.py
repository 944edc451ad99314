"""operations.registry: the champion alias moves only when the gate passes (real sqlite registry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from operations import registry as register
from operations import tracking
from cpcsam.errors import DataError


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.TRACKING_SWITCH_ENV, raising=False)
    params = {
        "data": {"profile": "oceancoco"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "reg"},
    }
    export = tmp_path / "export"
    export.mkdir()
    (export / "decoder_capl.onnx").write_bytes(b"onnx-bytes")
    (export / "parity.json").write_text('{"passed": true}')
    return params, tmp_path, export


def _candidate(params: dict, tmp_path: Path, export: Path, passed: bool, target_dice: float):
    gate = {
        "passed": passed,
        "reasons": [
            {"check": "min_target_dice", "value": target_dice, "threshold": 0.5, "passed": passed,
             "detail": f"target Dice {target_dice} vs minimum 0.5"},
            {"check": "onnx_parity", "passed": True, "detail": "ONNX parity passed"},
        ],
        "candidate": {"target_dice": target_dice, "base_dice": 0.7},
    }
    gate_path = tmp_path / f"gate-{target_dice}.json"
    gate_path.write_text(json.dumps(gate))
    with tracking.pipeline_run(params, run_name="pipeline") as run:
        return register.register_candidate(run.run_id, params, gate_path, export), run.run_id


def test_champion_moves_only_on_a_passed_gate(setup) -> None:
    params, tmp_path, export = setup
    client = tracking.make_client(params)

    first, run1 = _candidate(params, tmp_path, export, passed=True, target_dice=0.6)
    assert (first.model_name, first.version, first.promoted, first.champion_version) == ("cpcsam-oceancoco", "1", True, "1")

    rejected, run2 = _candidate(params, tmp_path, export, passed=False, target_dice=0.1)
    assert (rejected.version, rejected.promoted, rejected.champion_version) == ("2", False, "1")
    assert str(client.get_model_version_by_alias("cpcsam-oceancoco", "champion").version) == "1"
    # the rejected version stays visible, with its reasons
    version2 = client.get_model_version("cpcsam-oceancoco", "2")
    assert version2.tags["cpcsam.verdict"] == "rejected"
    assert version2.tags["cpcsam.gate.passed"] == "false"
    assert version2.tags["cpcsam.gate.reasons"].startswith("FAIL min_target_dice: target Dice 0.1")
    assert "REJECTED" in version2.description
    assert version2.run_id == run2
    # the model and the gate are on the run
    run = client.get_run(run2)
    assert run.data.metrics["gate/passed"] == 0.0
    artifacts = {a.path for a in client.list_logged_model_artifacts(version2.tags["cpcsam.model_id"], "artifacts/export")}
    assert artifacts == {"artifacts/export/decoder_capl.onnx", "artifacts/export/parity.json"}
    assert json.loads(Path(client.download_artifacts(run2, "gate/gate.json", str(tmp_path))).read_text())["passed"] is False

    better, _ = _candidate(params, tmp_path, export, passed=True, target_dice=0.8)
    assert (better.version, better.champion_version) == ("3", "3")
    assert register.champion_headline(params) == {"target_dice": 0.8, "base_dice": 0.7, "version": "3"}
    assert client.get_model_version("cpcsam-oceancoco", "1").tags["cpcsam.verdict"] == "passed"


def test_registering_the_same_run_twice_is_idempotent(setup) -> None:
    params, tmp_path, export = setup
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"passed": True, "reasons": []}))
    with tracking.pipeline_run(params) as run:
        a = register.register_candidate(run.run_id, params, gate, export)
        b = register.register_candidate(run.run_id, params, gate, export)
    assert a.version == b.version == "1"
    assert len(tracking.make_client(params).search_model_versions("name='cpcsam-oceancoco'")) == 1


def test_no_champion_before_any_pass(setup) -> None:
    params, tmp_path, export = setup
    assert register.champion_headline(params) is None
    _candidate(params, tmp_path, export, passed=False, target_dice=0.2)
    assert register.champion_headline(params) is None


def test_missing_gate_or_model_is_a_clear_error(setup) -> None:
    params, tmp_path, export = setup
    with pytest.raises(DataError, match="gate.json: gate result not found"):
        register.register_candidate("run", params, tmp_path / "gate.json", export)
    gate = tmp_path / "gate.json"
    gate.write_text('{"passed": true}')
    with pytest.raises(DataError, match="no exported"):
        register.register_candidate("run", params, gate, tmp_path / "nothing")


@pytest.mark.parametrize("candidate, param, served", [
    ({"target_dice": 0.6, "threshold": -3.0}, "auto", -3.0),  # evaluate.threshold: auto
    ({"target_dice": 0.6}, -1.5, -1.5),
])
def test_the_model_is_logged_with_the_threshold_it_was_scored_at(setup, candidate, param, served) -> None:
    """Under `evaluate.threshold: auto` the headline (gate.json's candidate) names the model's own
    threshold; otherwise it is `evaluate.threshold`. The served model_config carries it."""
    import mlflow
    import yaml

    params, tmp_path, export = setup
    params = {**params, "evaluate": {"threshold": param}}
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"passed": True, "reasons": [], "candidate": candidate}))
    with tracking.pipeline_run(params, run_name="pipeline") as run:
        result = register.register_candidate(run.run_id, params, gate, export)
    client = tracking.make_client(params)
    version = client.get_model_version(result.model_name, result.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source}/MLmodel", dst_path=str(tmp_path),
                                                tracking_uri=tracking.resolve_tracking_uri(params))
    config = yaml.safe_load(Path(local).read_text())["flavors"]["python_function"]["config"]
    assert config["threshold"] == served

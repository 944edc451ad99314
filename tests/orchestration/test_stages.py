"""flows.stages: DVC gives the order, repro skips what is done, overrides come and go, timeouts kill."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from cpcsam.errors import ConfigError
from flows import stages
from orchestration_helpers import make_toy_project


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CPCSAM_TRACKING", "off")  # mechanics only; tracking has its own tests
    return make_toy_project(tmp_path / "toy")


def test_order_comes_from_dvc_and_repro_skips_completed_stages(toy: Path) -> None:
    order = stages.stage_order(toy)
    assert order == ["make_a", "report"]  # dvc.yaml lists report first
    first = [stages.repro_stage(toy, s) for s in order]
    assert [r["ran"] for r in first] == [True, True]
    assert (toy / "out" / "report.txt").read_text() == "report of 1"
    again = [stages.repro_stage(toy, s) for s in order]
    assert [r["ran"] for r in again] == [False, False]


def test_a_failed_stage_raises_with_its_output_and_a_retry_succeeds(toy: Path) -> None:
    (toy / "fail_once_make_a").touch()
    with pytest.raises(stages.StageFailed, match="make_a: flaky failure"):
        stages.repro_stage(toy, "make_a")
    assert stages.repro_stage(toy, "make_a")["ran"] is True


def test_a_run_works_in_its_own_worktree_and_never_writes_the_checkout(toy: Path) -> None:
    from flows.workspace import isolated_workspace

    original = (toy / "params.yaml").read_text()
    with isolated_workspace(toy, ["train.steps=7", "data.profile=tiny", "new.section.key=[1, 2]"], "t") as ws:
        assert ws != toy and ws.parent == toy / ".workspaces"
        text = (ws / "params.yaml").read_text()
        params = yaml.safe_load(text)
        assert params["train"]["steps"] == 7 and params["data"]["profile"] == "tiny"
        assert params["new"]["section"]["key"] == [1, 2]
        assert "the comments must survive overrides" in text and "# read by make_a" in text
        stages.repro_stage(ws, "make_a")
        assert (ws / "out" / "a.txt").read_text() == "7"
        assert (toy / "params.yaml").read_text() == original and not (toy / "out").exists()
    assert not ws.exists() and (toy / "params.yaml").read_text() == original
    with pytest.raises(RuntimeError), isolated_workspace(toy, ["train.steps=9"], "t") as ws:
        raise RuntimeError("stage failed")
    assert not ws.exists() and (toy / "params.yaml").read_text() == original
    with pytest.raises(ConfigError, match="expected key.sub=value"), isolated_workspace(toy, ["train.steps"], "t"):
        pass


def test_training_checkpoints_outlive_a_killed_run_for_the_next_run_of_its_profile(toy: Path) -> None:
    """A worker SIGKILLed mid-training never reaches the workspace cleanup; what matters is that the
    next run of the profile with the same overrides finds the checkpoints (the trainer resumes from
    them: test_checkpoint's `test_sigkilled_run_resumes_to_the_same_result`), and that another
    profile or other overrides do not."""
    from flows.workspace import isolated_workspace

    with isolated_workspace(toy, ["train.steps=7"], "train-tiny") as first:
        (first / "artifacts" / "checkpoints" / "cpcsam").mkdir(parents=True)
        (first / "artifacts" / "checkpoints" / "cpcsam" / "step_000004.pt").write_bytes(b"state")
    with isolated_workspace(toy, ["train.steps=7"], "train-tiny") as second:
        assert second != first
        assert (second / "artifacts" / "checkpoints" / "cpcsam" / "step_000004.pt").read_bytes() == b"state"
    for label, overrides in (("train-other", ["train.steps=7"]), ("train-tiny", ["train.steps=8"])):
        with isolated_workspace(toy, overrides, label) as other:
            assert list((other / "artifacts" / "checkpoints").iterdir()) == []


def test_a_stage_over_its_timeout_is_killed(toy: Path) -> None:
    with open(toy / "dvc.yaml", "a") as fh:
        fh.write("  sleepy:\n    cmd: python -c \"import time; time.sleep(120)\"\n")
    start = time.monotonic()
    with pytest.raises(stages.StageFailed, match="timed out after 3 s"):
        stages.repro_stage(toy, "sleepy", timeout=3)
    assert time.monotonic() - start < 30


def test_topological_order_keeps_file_order_on_ties_and_rejects_cycles() -> None:
    assert stages.topological(["c", "a", "b"], [("a", "b")]) == ["c", "a", "b"]
    assert stages.topological(["b", "a"], [("a", "b")]) == ["a", "b"]
    with pytest.raises(ConfigError, match="cycle"):
        stages.topological(["a", "b"], [("a", "b"), ("b", "a")])

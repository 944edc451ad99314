"""flows.stages: DVC gives the order, repro skips what is done, overrides come and go, timeouts kill."""

from __future__ import annotations

import os
import re
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
    order, _ = stages.stage_graph(toy)
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


def test_run_graph_waits_for_upstream_and_runs_up_to_jobs_at_once() -> None:
    """a -> c, b -> c, c -> d; a and b are independent. With 2 jobs a and b overlap; c starts only
    after both returned; with 1 job nothing overlaps."""
    import threading

    edges = [("a", "c"), ("b", "c"), ("c", "d")]
    for jobs, expect_overlap in ((2, True), (1, False)):
        lock, running, peak, log = threading.Lock(), set(), [0], []

        def run_one(stage: str) -> str:
            with lock:
                running.add(stage)
                peak[0] = max(peak[0], len(running))
                log.append(("start", stage))
            time.sleep(0.3)
            with lock:
                running.discard(stage)
                log.append(("end", stage))
            return stage.upper()

        assert stages.run_graph(["a", "b", "c", "d"], edges, run_one, jobs) == ["A", "B", "C", "D"]
        assert peak[0] == (2 if expect_overlap else 1)
        assert log.index(("start", "c")) > max(log.index(("end", "a")), log.index(("end", "b")))
        assert log.index(("start", "d")) > log.index(("end", "c"))


def test_run_graph_starts_nothing_after_a_failure_and_lets_running_stages_finish() -> None:
    import threading

    started, finished, lock = [], [], threading.Lock()

    def run_one(stage: str) -> None:
        with lock:
            started.append(stage)
        if stage == "bad":
            raise stages.StageFailed("bad: broken")
        time.sleep(0.5)  # "slow" is still running when "bad" fails
        with lock:
            finished.append(stage)

    order = ["slow", "bad", "after_bad", "independent"]
    with pytest.raises(stages.StageFailed, match="bad: broken"):
        stages.run_graph(order, [("bad", "after_bad")], run_one, jobs=2)
    assert started == ["slow", "bad"] and finished == ["slow"]


def test_upstream_closure_keeps_a_target_and_all_it_needs() -> None:
    order = ["ingest", "validate", "perturb", "train@a", "train@b", "evaluate"]
    edges = [("ingest", "validate"), ("ingest", "perturb"), ("perturb", "train@a"), ("perturb", "train@b"),
             ("train@a", "evaluate"), ("train@b", "evaluate")]
    assert stages.upstream_closure("train@a", order, edges) == ["ingest", "perturb", "train@a"]
    assert stages.upstream_closure("evaluate", order, edges) == [s for s in order if s != "validate"]
    with pytest.raises(ConfigError, match="no stage 'trian@a'"):
        stages.upstream_closure("trian@a", order, edges)


def test_parallel_jobs_divides_the_cores_by_what_one_stage_uses(project_root: Path) -> None:
    from cpcsam.config import load_config

    params = project_root / "params.yaml"
    assert stages.parallel_jobs(load_config(params), cores=2) == 2  # every stage on one thread
    assert stages.parallel_jobs(load_config(params), cores=8) == 8
    assert stages.parallel_jobs(load_config(params, ["train.threads=2"]), cores=8) == 4
    assert stages.parallel_jobs(load_config(params, ["evaluate.threads=0"]), cores=8) == 1  # 0: all cores
    assert stages.parallel_jobs(load_config(params, ["train.distributed.nproc_per_node=2"]), cores=2) == 1
    assert stages.parallel_jobs(load_config(params, ["tracking.flow.stage_jobs=3"]), cores=2) == 3


def test_cpcsam_run_runs_independent_stages_side_by_side_and_stops_at_a_failure(
    toy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from cpcsam import cli
    from flows.workspace import write_overrides

    with open(toy / "dvc.yaml", "a") as fh:  # two stages that depend on nothing
        for name in ("side_1", "side_2"):
            fh.write(f"  {name}:\n    cmd: python -c \"import time; time.sleep(1); open('{name}.txt', 'w').write('x')\"\n"
                     f"    outs: [{name}.txt]\n")
    write_overrides(toy / "params.yaml", ["tracking.flow.stage_jobs=2"])
    monkeypatch.chdir(toy)
    assert cli.main(["run"]) == 0
    out = capsys.readouterr().out
    assert "4 stages, up to 2 at once" in out
    assert re.search(r"started \S+ \(running: \S+, \S+\)", out), f"no two stages ran at once:\n{out}"
    assert out.index("report: ran") > out.index("make_a: ran")
    assert (toy / "out" / "report.txt").read_text() == "report of 1" and (toy / "side_2.txt").is_file()
    assert "make_a: flaky" not in (toy / "logs" / "make_a.log").read_text()

    assert cli.main(["run", "report"]) == 0  # a target: it and what it needs, all up to date now
    assert "2 stages" in capsys.readouterr().out

    write_overrides(toy / "params.yaml", ["train.steps=2"])  # make_a and report must run again
    (toy / "fail_once_make_a").touch()
    assert cli.main(["run"]) == 1
    captured = capsys.readouterr()
    assert "make_a: FAILED" in captured.out and "make_a: flaky failure" in captured.out
    assert "a stage failed" in captured.err and "report: ran" not in captured.out
    assert (toy / "out" / "report.txt").read_text() == "report of 1"  # not re-made from a failed upstream


def test_ctrl_c_during_run_graph_stops_the_running_stages(toy: Path) -> None:
    """The dvc commands run in their own sessions (so a timeout kills a stage's children), where the
    terminal's Ctrl-C does not reach them: an interrupted run_graph must stop them itself rather
    than wait for them to finish."""
    import signal
    import threading

    with open(toy / "dvc.yaml", "a") as fh:
        for name in ("sleepy_1", "sleepy_2"):
            fh.write(f"  {name}:\n    cmd: python -c \"import time; time.sleep(120)\"\n")
    order, edges = stages.stage_graph(toy)
    # Ctrl-C while both sleep: a real SIGINT to this process, with Python's own handler (an xdist
    # worker may have another)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(4, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            stages.run_graph([s for s in order if s.startswith("sleepy")], edges,
                             lambda stage: stages.repro_stage(toy, stage), jobs=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 30
    assert not stages._RUNNING_GROUPS

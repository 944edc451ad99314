"""Who scores the models: two forked processes with one torch thread per model, this process
otherwise; results in the engines' order either way, a dead worker named, no orphan left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cpcsam.evaluation import protocols
from cpcsam.evaluation.protocols import EvalConfig, ModelResult, Protocol, score_models

ROOT = Path(__file__).resolve().parents[2]
CFG = EvalConfig(protocols=[Protocol.parse("box@0")])


def _who_scored(engine, images, base, target, support, cfg, load_image, name) -> ModelResult:
    """Stands in for `evaluate_model`: records the process and the model it was asked for."""
    if name == "dies":
        os._exit(3)
    return ModelResult({"box@0": {"target": {"dice": None}, "pid": os.getpid(), "model": name}}, {}, [])


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _score(names: list[str]) -> dict[str, ModelResult]:
    return score_models({name: object() for name in names}, [], [], [], CFG, lambda im: None)


def test_one_thread_per_model_scores_in_two_forked_processes(monkeypatch, torch_threads) -> None:
    monkeypatch.setattr(protocols, "evaluate_model", _who_scored)
    torch_threads(1)
    names = ["e", "d", "c", "b", "a"]
    results = _score(names)
    assert list(results) == names
    assert [r.protocols["box@0"]["model"] for r in results.values()] == names
    pids = {r.protocols["box@0"]["pid"] for r in results.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_more_torch_threads_score_in_this_process(monkeypatch, torch_threads) -> None:
    monkeypatch.setattr(protocols, "evaluate_model", _who_scored)
    torch_threads(2)
    results = _score(["b", "a"])
    assert list(results) == ["b", "a"]
    assert {r.protocols["box@0"]["pid"] for r in results.values()} == {os.getpid()}


def test_a_worker_that_dies_is_reported(monkeypatch, torch_threads) -> None:
    monkeypatch.setattr(protocols, "evaluate_model", _who_scored)
    torch_threads(1)
    with pytest.raises(RuntimeError, match="worker process scoring models died"):
        _score(["a", "dies", "b"])


ORPHAN_SCRIPT = """
import os, sys, time
import torch
from cpcsam.evaluation import protocols
from cpcsam.evaluation.protocols import EvalConfig, Protocol, score_models

def stuck(engine, images, base, target, support, cfg, load_image, name):
    open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
    time.sleep(120)

protocols.evaluate_model = stuck
torch.set_num_threads(1)
score_models({"a": object(), "b": object()}, [], [], [], EvalConfig([Protocol.parse("box@0")]), lambda im: None)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
def test_workers_do_not_outlive_a_killed_stage(tmp_path: Path) -> None:
    """SIGKILL the scoring process (an orchestrator's hard cancel, the OOM killer): its two
    workers go too, instead of waiting for work from a dead pool."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(ORPHAN_SCRIPT), str(tmp_path)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        while len(workers := [int(p.name) for p in tmp_path.iterdir()]) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, "the two workers never started"
            time.sleep(0.1)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived the killed stage"

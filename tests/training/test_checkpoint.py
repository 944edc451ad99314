"""Checkpoints: atomic files, resume after SIGKILL equals an uninterrupted run, foreign runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cpcsam.errors import CheckpointError
from cpcsam.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, tree_digest
from training_helpers import trainer_from_dicts as prepare_training

# Runs the trainer on the tiny project; argv: params.json project_root out_dir seconds_per_batch.
# The optional sleep (a batch hook: it changes no number) makes the run slow enough to kill mid-way.
RUNNER = """
import json, sys, time
from pathlib import Path
import pandas as pd
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[5])
from training_helpers import trainer_from_dicts as prepare_training
params = json.loads(Path(sys.argv[1]).read_text())
root, out, pause = Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
trainer = prepare_training(params, pd.read_parquet(root / "manifest.parquet"),
                           pd.read_parquet(root / "prompts.parquet"), root / "sam.pth", out)
def slow(step, level, batch):
    time.sleep(pause)
    return batch
if pause:
    trainer.batch_hook = slow
print("RESUMED_AT", trainer.step if trainer.resume() else 0, flush=True)
trainer.run(resume=False, progress=False)
torch.save({n: p.detach() for n, p in trainer.model.named_parameters()}, out / "final_weights.pt")
"""


def _start(script: Path, params: Path, root: Path, out: Path, pause: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(params), str(root), str(out), str(pause), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> int:
    """Wait for a runner; returns the step it resumed at (0: started fresh)."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return int(out.split("RESUMED_AT")[1].split()[0])


def test_sigkilled_run_resumes_to_the_same_result(tiny_project, tiny_params, tmp_path) -> None:
    tiny_params["train"].update(steps=16, checkpoint_every=4, keep_checkpoints=2)
    params = tmp_path / "params.json"
    params.write_text(json.dumps(tiny_params))
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    root = tiny_project["root"]

    reference = _start(script, params, root, tmp_path / "reference", pause=0.0)

    out = tmp_path / "killed"
    proc = _start(script, params, root, out, pause=0.05)
    deadline = time.monotonic() + 240
    while latest_checkpoint(out / "checkpoints") is None:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert killed_at and max(killed_at) < 16 and not (out / "metrics.json").exists()

    # restart: resumes from the latest checkpoint (not from scratch)
    assert _finish(_start(script, params, root, out, pause=0.0)) == max(killed_at)
    assert _finish(reference) == 0

    a = torch.load(out / "final_weights.pt", weights_only=True)
    b = torch.load(tmp_path / "reference" / "final_weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    metrics_a = json.loads((out / "metrics.json").read_text())
    metrics_b = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics_a["final"] == metrics_b["final"] and metrics_a["steps"] == 16
    assert metrics_a["images_seen"] == metrics_b["images_seen"]
    assert (out / "curve.csv").read_text() == (tmp_path / "reference" / "curve.csv").read_text()


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path) -> None:
    (tmp_path / ".step_000009.pt.abc.tmp").write_bytes(b"torn write of a killed process")
    for step in (3, 6, 9):
        save_checkpoint(tmp_path, step, {"step": step, "x": torch.ones(2) * step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 9]
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["x"], torch.full((2,), 9.0))
    (tmp_path / "step_000012.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step_000012.pt"):
        load_checkpoint(tmp_path / "step_000012.pt")


def test_checkpoint_of_another_configuration_is_not_resumed(tiny_project, tiny_params, tmp_path) -> None:
    def trainer(**overrides):
        return prepare_training(
            tiny_params, tiny_project["manifest"], tiny_project["prompts"], tiny_project["sam_checkpoint"],
            tmp_path, train_overrides=overrides,
        )

    trainer(steps=2).run(progress=False)
    assert trainer(steps=3).resume() is False  # other params: start over, old checkpoints removed
    assert list_checkpoints(tmp_path / "checkpoints") == []
    first = trainer(steps=2)
    first.run(progress=False)
    again = trainer(steps=2)
    assert again.resume() is True and again.step == 2


def test_checkpoint_of_other_code_is_not_resumed(tiny_project, tiny_params, tmp_path, monkeypatch) -> None:
    """A changed source file makes DVC run the train stage again: it must train, not "resume" the
    previous code's finished run and write that model under the new code's hash."""
    import cpcsam.training.run as run

    def trainer():
        return prepare_training(tiny_params, tiny_project["manifest"], tiny_project["prompts"],
                                tiny_project["sam_checkpoint"], tmp_path, train_overrides={"steps": 2})

    trainer().run(progress=False)
    assert trainer().resume() is True  # the same code: the finished run is the result
    monkeypatch.setattr(run, "source_digest", lambda: "the digest of edited sources")
    assert trainer().resume() is False
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_tree_digest_follows_the_python_sources(tmp_path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    first = tree_digest(tmp_path / "pkg")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    (tmp_path / "pkg" / "sub" / "__pycache__").mkdir()
    assert tree_digest(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 3\n")
    assert tree_digest(tmp_path / "pkg") != first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    assert tree_digest(tmp_path / "pkg") == first
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "b.py")  # same bytes, another module
    assert tree_digest(tmp_path / "pkg") != first

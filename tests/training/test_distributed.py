"""Training on several processes (torch.distributed, gloo on the CPU) computes the single-process step.

- Two spawned processes against one, every trainer mode: the same losses, gradients and weights
  after a few steps (float64, so that a correct reduction agrees to ~1e-13 and a wrong one cannot
  hide in float32 rounding that Adam blows up), the same weights on every rank, gradient isolation
  between the levels; two planted bugs (no gradient all-reduce; the unrolled hypergradient without
  its cross-rank terms) fail the same comparison.
- The `train` stage re-launches itself under torchrun; rank 0 alone writes outs and the MLflow run;
  the embedding cache built by two processes is byte-identical to one process's.
- A worker killed mid-run fails the job with a clear message, and the stage resumes from the last
  checkpoint with another number of processes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from components import train
from cpcsam.config import read_params_file
from cpcsam.errors import ConfigError
from cpcsam.training.distributed import World
from distributed_helpers import project_files, run_cases, spawn_cases
from training_helpers import trainer_from_dicts

ROOT = Path(__file__).resolve().parents[2]

F64 = {"float64": True, "steps": 3}
CASES: list[dict[str, Any]] = [
    {"name": "bilevel first-order", "train": {"mode": "bilevel"}, **F64},
    {"name": "bilevel unrolled", "train": {"mode": "bilevel", "hypergradient": "unrolled"}, **F64},
    # soft prompts per label type: a rank whose slice lacks a label type has no gradient for it
    {"name": "bilevel learnable", "train": {"mode": "bilevel"}, "capl": "learnable", **F64},
    # 3 images over 2 ranks, 2-3 entities each: uneven image and entity counts per rank
    {"name": "lora-only", "train": {"mode": "lora-only", "batch_images": 3, "max_entities": 3}, "capl": "fixed", **F64},
    {"name": "full-finetune", "train": {"mode": "full-finetune", "batch_images": 4}, "capl": "fixed",
     "float64": True, "steps": 2},
    {"name": "bilevel first-order, float32", "train": {"mode": "bilevel"}, "steps": 3},
    {"name": "isolation", "train": {"mode": "bilevel"}, "steps": 1, "isolation": True},
    {"name": "planted: no gradient all-reduce", "train": {"mode": "bilevel"}, "bug": "no-gradient-all-reduce", **F64},
    {"name": "planted: unrolled without cross-rank terms", "train": {"mode": "bilevel", "hypergradient": "unrolled"},
     "bug": "no-cross-terms", **F64},
]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-300))


def compare(one: dict[str, Any], two: dict[str, Any]) -> dict[str, float]:
    """The largest disagreements between a one-process and a two-process result; `update` is
    ‖Δw₂ − Δw₁‖ / ‖Δw₁‖ over all trainable weights (how far the two-process steps are from the
    one-process steps as a whole)."""
    losses = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300)
                 for a, b in zip(one["metrics"], two["metrics"]) for k in a if k.startswith("loss"))
    grads = max([_relative(a, b) for level in ("upper", "lower")
                 for a, b in zip(one["gradients"][level], two["gradients"][level])] or [0.0])
    weights = max(float((one["trainable"][n] - two["trainable"][n]).abs().max()) for n in one["trainable"])
    names = list(one["trainable"])
    step_one = torch.cat([(one["trainable"][n] - one["initial"][n]).flatten().double() for n in names])
    step_two = torch.cat([(two["trainable"][n] - two["initial"][n]).flatten().double() for n in names])
    update = float((step_two - step_one).norm() / step_one.norm().clamp_min(1e-300))
    return {"loss": losses, "gradient": grads, "weight": weights, "update": update}


@pytest.fixture(scope="module")
def one_and_two(tiny_project, tmp_path_factory) -> list[tuple[dict, dict, dict]]:
    files = project_files(tiny_project)
    cases = [{k: v for k, v in case.items() if k != "name"} for case in CASES]
    with _quiet():
        one = run_cases(cases, files)
    two = spawn_cases(cases, files, 2, tmp_path_factory.mktemp("spawn"))
    return list(zip(CASES, one, two))


class _quiet:
    """Recording the optimisers' steps wraps `optimizer.step`; the schedulers then warn."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*optimizer.step.*")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _result(one_and_two, name: str) -> tuple[dict, dict]:
    for case, one, two in one_and_two:
        if case["name"] == name:
            return one, two
    raise KeyError(name)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("name", ["bilevel first-order", "bilevel unrolled", "bilevel learnable", "lora-only",
                                  "full-finetune"])
def test_two_processes_compute_the_one_process_steps(one_and_two, name) -> None:
    one, two = _result(one_and_two, name)
    assert one["world"] == 1 and two["world"] == 2
    assert len(one["metrics"]) == len(two["metrics"]) and one["images_seen"] == two["images_seen"]
    assert two["same_on_every_rank"]
    worst = compare(one, two)
    assert worst["loss"] <= 1e-12 and worst["gradient"] <= 1e-10 and worst["weight"] <= 1e-10, worst


@pytest.mark.slow
def test_two_processes_in_float32_agree_to_rounding(one_and_two) -> None:
    """float32: losses and the first step's gradients to rounding. Single weights may still differ
    by more than the learning rate: Adam divides a gradient entry of rounding size by its own
    magnitude (m̂/√v̂ ≈ ±1 for |g| ≈ 1e-8), so two runs whose rounding differs in sign step such an
    entry in opposite directions (a max-abs bound of lr failed once at 1.3·lr). Such entries are
    a minority, so the update as a whole agrees to ~1 %: that is what is bounded, and a planted reduction bug
    moves it by far more (test below)."""
    one, two = _result(one_and_two, "bilevel first-order, float32")
    worst = compare(one, two)
    first = max(_relative(one["gradients"][level][0], two["gradients"][level][0]) for level in ("upper", "lower"))
    assert worst["loss"] <= 1e-5 and first <= 1e-5, (worst, first)
    assert worst["update"] <= 0.05, worst  # measured 0.0098 (max-abs 0.0039 = 1.3 lr); no all-reduce: 0.66


@pytest.mark.slow
@pytest.mark.parametrize("name", ["planted: no gradient all-reduce", "planted: unrolled without cross-rank terms"])
def test_the_comparison_catches_a_planted_bug(one_and_two, name) -> None:
    one, two = _result(one_and_two, name)
    worst = compare(one, two)
    assert worst["gradient"] > 1e-6 and worst["weight"] > 1e-8, worst
    if name == "planted: no gradient all-reduce":  # the float32 test's bound separates a wrong reduction
        assert worst["update"] > 0.1, worst


@pytest.mark.slow
def test_gradient_isolation_holds_with_two_processes(one_and_two) -> None:
    one, two = _result(one_and_two, "isolation")
    for result in (one, two):
        upper, lower = result["isolation"]["upper"], result["isolation"]["lower"]
        assert upper["changed"] and all(n.startswith("capl.") for n in upper["changed"])
        assert lower["changed"] and all("lora_" in n for n in lower["changed"])
        assert not upper["with_grad"] and not lower["with_grad"]  # freed after each step, none leaked
    assert two["isolation"] == one["isolation"]
    assert two["same_on_every_rank"]


PRETRAIN_CASES: list[dict[str, Any]] = [
    {"name": "pretrain"},
    {"name": "planted: no gradient all-reduce", "bug": "no-gradient-all-reduce"},
    {"name": "planted: clicks drawn from the start of the stream", "bug": "no-click-skip"},
]


@pytest.fixture(scope="module")
def pretrain_one_and_two(tiny_project, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """3 scenes per step over 2 ranks (2 + 1: uneven object counts), two corrective clicks per object."""
    from distributed_helpers import pretrain_case, spawn_pretrain_cases

    files = project_files(tiny_project)
    one = pretrain_case(files, {}, World())
    two = spawn_pretrain_cases(PRETRAIN_CASES, files, 2, tmp_path_factory.mktemp("pretrain"))
    return {case["name"]: (one, result) for case, result in zip(PRETRAIN_CASES, two)}


def _update_gap(one: dict, two: dict, init: dict) -> float:
    """‖Δw₂ − Δw₁‖ / ‖Δw₁‖ over all weights: how far two processes' steps are from one process's."""
    keys = [k for k in one["weights"] if one["weights"][k].is_floating_point()]
    d1 = torch.cat([(one["weights"][k] - init[k]).flatten() for k in keys])
    d2 = torch.cat([(two["weights"][k] - init[k]).flatten() for k in keys])
    return float((d2 - d1).norm() / d1.norm())


@pytest.mark.slow
def test_two_processes_pretrain_as_one(pretrain_one_and_two, tiny_project) -> None:
    """float32: the first step's loss (before any update, clicks included) to rounding; the
    weights after three steps to Adam's amplified rounding (a sign flip on a ~0 gradient entry)."""
    init = torch.load(tiny_project["sam_checkpoint"], weights_only=True)
    one, two = pretrain_one_and_two["pretrain"]
    assert one["world"] == 1 and two["world"] == 2 and two["same_on_every_rank"]
    for key in ("loss", "mask_loss", "iou_loss", "mask_iou"):
        assert abs(two["first"][key] - one["first"][key]) <= 1e-5 * max(1.0, abs(one["first"][key])), key
    assert _update_gap(one, two, init) <= 0.01  # measured 0.0013; the planted bugs 0.5-0.9


@pytest.mark.slow
def test_the_pretrain_comparison_catches_planted_bugs(pretrain_one_and_two, tiny_project) -> None:
    init = torch.load(tiny_project["sam_checkpoint"], weights_only=True)
    one, unreduced = pretrain_one_and_two["planted: no gradient all-reduce"]
    assert not unreduced["same_on_every_rank"] and _update_gap(one, unreduced, init) > 0.1
    one, unskipped = pretrain_one_and_two["planted: clicks drawn from the start of the stream"]
    assert abs(unskipped["first"]["loss"] - one["first"]["loss"]) > 1e-5


def test_pretrain_refuses_fewer_scenes_than_processes(tiny_project, monkeypatch) -> None:
    from cpcsam.config import PretrainConfig
    from cpcsam.training import pretrain

    monkeypatch.setattr(pretrain, "current_world", lambda: World(rank=0, size=3, local_rank=0))
    cfg = PretrainConfig.from_params({**tiny_project["params"]["pretrain"], "batch_images": 2, "steps": 1})
    with pytest.raises(ConfigError, match=r"pretrain.batch_images \(2\) is smaller than the number of processes \(3\)"):
        pretrain.pretrain_sam(tiny_project["params"]["model"], cfg, None, progress=False)


@pytest.mark.parametrize("override, message", [
    ("train.distributed.nprocs_per_node=2", "did you mean 'train.distributed.nproc_per_node'"),
    ("train.distributed.gpus=2", "unknown key 'train.distributed.gpus'; known keys: ['backend', 'nproc_per_node']"),
    ("train.distributed.nproc_per_node=0", "train.distributed.nproc_per_node"),
    ("train.distributed.backend=mpi", "train.distributed.backend"),
])
def test_distributed_params_are_typed(override, message) -> None:
    from cpcsam.config import load_config

    assert load_config(ROOT / "params.yaml").train.distributed.nproc_per_node == 1
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "params.yaml", [override])


def test_fewer_images_than_processes_is_refused(tiny_project, tiny_params, monkeypatch) -> None:
    import cpcsam.training.bilevel as bilevel

    monkeypatch.setattr(bilevel, "current_world", lambda: World(rank=0, size=3, local_rank=0))
    with pytest.raises(ConfigError, match="3 processes share each global batch.*2 images"):
        trainer_from_dicts(tiny_params, tiny_project["manifest"], tiny_project["prompts"],
                           tiny_project["sam_checkpoint"], None, train_overrides={"batch_images": 2})


def test_rank_slices_make_up_the_global_batch(tiny_project, tiny_params) -> None:
    trainer = trainer_from_dicts(tiny_params, tiny_project["manifest"], tiny_project["prompts"],
                                 tiny_project["sam_checkpoint"], None,
                                 train_overrides={"mode": "lora-only", "batch_images": 3, "max_entities": 3})
    stream = trainer.lower_stream
    for _ in range(3):
        state = stream.state_dict()
        whole = stream.next()
        after = stream.state_dict()
        slices = []
        for rank in range(2):
            stream.load_state_dict(state)
            slices.append(stream.next(shard=(rank, 2)))
            assert stream.state_dict() == after  # every rank advances by the global batch
        assert [i for s in slices for i in s.image_ids] == whole.image_ids
        assert [e for s in slices for e in s.entity_ids] == whole.entity_ids
        assert torch.equal(torch.cat([s.targets for s in slices]), whole.targets)
        assert torch.equal(torch.cat([s.coords for s in slices]), whole.coords)
        assert [s.entity_offset for s in slices] == [0, slices[0].num_entities]
        assert all(s.global_entities == whole.num_entities and s.global_images == 3 for s in slices)


# ---- the stage under torchrun ---------------------------------------------------------------------


@pytest.mark.parametrize("statuses, torchrun_exit, expected, says", [
    ({0: 0, 1: 0}, 0, 0, None),
    ({0: 1, 1: 2}, 1, 2, None),  # a refused input wins over the crash it caused on the other rank
    ({0: 3, 1: 0}, 1, 3, None),
    ({0: 1}, 1, 1, "rank 0 exited with 1; rank 1 ended without an exit status"),
])
def test_the_launcher_reports_the_workers_exit(monkeypatch, capsys, statuses, torchrun_exit, expected, says) -> None:
    """`launch_under_torchrun` with a stand-in for torchrun that writes the ranks' statuses."""
    from components import cli

    script = ("import os, pathlib, sys; d = pathlib.Path(os.environ['CPCSAM_RANK_STATUS_DIR']); "
              f"[(d / f'rank_{{r}}').write_text(str(c)) for r, c in {statuses!r}.items()]; sys.exit({torchrun_exit})")
    monkeypatch.setattr(cli, "torchrun_command", lambda module, argv, nproc: [sys.executable, "-c", script])
    assert cli.launch_under_torchrun("train", [], 2, hint=lambda: "Running the stage again resumes from X") == expected
    err = capsys.readouterr().err
    if says:
        assert says in err and err.strip().endswith("Running the stage again resumes from X")
    else:
        assert "run failed" not in err


def _workdir(tiny_project, tmp_path: Path, steps: int, tracking: bool = False, encoder_lora: bool = True) -> Path:
    tiny = copy.deepcopy(tiny_project["params"])
    params = read_params_file(ROOT / "params.yaml")
    params["tracking"] = ({"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "artifact_location": str(tmp_path / "mlruns"), "data_stages": []}
                          if tracking else {"enabled": False})
    params["variants"] = ["cpcsam", "lora_only"]
    model = {k: v for k, v in tiny["model"].items() if k != "capl"}
    model["capl"] = {k: v for k, v in tiny["model"]["capl"].items() if k != "mode"}
    if not encoder_lora:
        model["lora"]["targets"] = ["decoder_attention"]  # a frozen encoder: the embed stage caches
    params["model"] = model
    params["perturb"] = tiny["perturb"]
    train_section = {k: v for k, v in tiny["train"].items() if k != "mode"}
    params["train"] = {**train_section, "steps": steps, "checkpoint_every": 2,
                       "embedding_cache": "off" if encoder_lora else "auto"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _stage_args(tiny_project, work: Path, out: str, *extra: str) -> list[str]:
    root = tiny_project["root"]
    return ["--params", str(work / "params.yaml"), "--manifest", str(root / "manifest.parquet"),
            "--prompts", str(root / "prompts.parquet"), "--sam", str(tiny_project["sam_checkpoint"]),
            "--out", str(work / out), "--checkpoints", str(work / f"{out}-checkpoints"), *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CPCSAM_TRACKING")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _trainable(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and ("lora_" in k or k.startswith("capl."))}


@pytest.mark.slow
def test_stage_relaunches_under_torchrun_rank_0_writes(tiny_project, tmp_path, monkeypatch, capsys) -> None:
    """embed + train (lora_only, cached embeddings) with nproc_per_node 2 (torchrun) against 1 (here)."""
    for name in ("MLFLOW_TRACKING_URI", "CPCSAM_TRACKING", "CPCSAM_MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    work = _workdir(tiny_project, tmp_path, steps=4, tracking=True, encoder_lora=False)
    sam = str(tiny_project["sam_checkpoint"])
    manifest = str(tiny_project["root"] / "manifest.parquet")
    two = ["-S", "train.distributed.nproc_per_node=2"]
    embed_args = ["--params", str(work / "params.yaml"), "--manifest", manifest, "--sam", sam]
    # Both in a process of their own, as DVC runs a stage: on an AVX-512 EPYC the encoder's bytes in
    # this test's process (after the fixture's in-process pretraining) differed from a fresh
    # process's by ~1e-6, whatever the process count.
    for out, extra in (("emb1", []), ("emb2", two)):
        proc = subprocess.run([sys.executable, "-m", "components.embed", *embed_args, "--out", str(work / out), *extra],
                              cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    files1, files2 = sorted(p.name for p in (work / "emb1").iterdir()), sorted(p.name for p in (work / "emb2").iterdir())
    assert files1 == files2 and len(files1) > 2
    assert all((work / "emb1" / f).read_bytes() == (work / "emb2" / f).read_bytes() for f in files1)

    def stage(out: str) -> list[str]:
        return _stage_args(tiny_project, work, out, "--variant", "lora_only", "--embeddings", str(work / "emb1"))

    assert train.main(stage("one")) == 0
    proc = subprocess.run([sys.executable, "-m", "components.train", *stage("two"), *two], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes under torchrun" in proc.stderr and "[rank 1]" in proc.stderr
    assert proc.stdout.count("train[lora_only: lora-only]: 4 steps") == 1  # rank 0's closing line only
    assert sorted(p.name for p in (work / "two-checkpoints").iterdir()) == ["step_000002.pt", "step_000004.pt",
                                                                          "timing.json"]
    one, two_ = (pd.read_csv(work / d / "curve.csv") for d in ("one", "two"))
    assert list(one["step"]) == list(two_["step"]) == [1, 2, 3, 4]
    assert (one["loss_lower"] - two_["loss_lower"]).abs().max() <= 1e-5 * one["loss_lower"].abs().max()
    m1, m2 = (json.loads((work / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m1["budget"] == m2["budget"] and m2["cached_embeddings"]
    w1, w2 = _trainable(work / "one" / "model.pt"), _trainable(work / "two" / "model.pt")
    assert w1.keys() == w2.keys() and w1
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-4

    # one MLflow run per stage run: rank 1 logged nothing
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = client.search_experiments()
    found = client.search_runs([e.experiment_id for e in experiments], "tags.mlflow.runName = 'train@lora_only'")
    assert len(found) == 2 and sorted(r.data.params.get("train.processes") for r in found) == ["1", "2"]
    assert len(client.search_runs([e.experiment_id for e in experiments], "tags.mlflow.runName = 'embed'")) == 2


@pytest.mark.slow
def test_two_nodes_rendezvous_over_c10d_and_train_as_one_process(tiny_project, tmp_path) -> None:
    """Two torchrun "nodes" (one process each, --node-rank 0/1) joined by the c10d rendezvous on a TCP
    endpoint, as infra/k8s/train-multinode.yaml runs them on two pods: the same training as one process."""
    from distributed_helpers import free_port

    work = _workdir(tiny_project, tmp_path, steps=4)
    stage = ["-m", "components.train", *_stage_args(tiny_project, work, "two", "--variant", "lora_only")]
    assert train.main(_stage_args(tiny_project, work, "one", "--variant", "lora_only")) == 0
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                               "--rdzv-id=test-two-nodes", "--max-restarts=0", *stage],
                              cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "[rank 1]" in outputs[0][1] + outputs[1][1]
    one, two = (pd.read_csv(work / d / "curve.csv") for d in ("one", "two"))
    assert list(one["step"]) == list(two["step"]) == [1, 2, 3, 4]
    assert (one["loss_lower"] - two["loss_lower"]).abs().max() <= 1e-5 * one["loss_lower"].abs().max()
    w1, w2 = _trainable(work / "one" / "model.pt"), _trainable(work / "two" / "model.pt")
    assert w1.keys() == w2.keys() and w1
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-4


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(item[5:]) for item in environ if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_a_killed_worker_fails_the_job_and_the_stage_resumes(tiny_project, tmp_path, capsys) -> None:
    steps = 40
    work = _workdir(tiny_project, tmp_path, steps=steps)
    args = _stage_args(tiny_project, work, "out", "--variant", "cpcsam")
    checkpoints = work / "out-checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "components.train", *args, "-S", "train.distributed.nproc_per_node=2"],
                            cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "step_000004.pt").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint in 300 s"
            time.sleep(0.02)
        victims = [pid for pid in _descendants(proc.pid) if _rank_of(pid) == 1]
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1  # a crash (retryable), not a refused input
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("train: the 2-process run failed") and "rank 1 ended without an exit status" in last
    assert "resumes from" in last and str(checkpoints) in last
    saved = sorted(int(p.name[5:11]) for p in checkpoints.glob("step_*.pt"))
    assert saved and saved[-1] < steps  # killed mid-run
    resume_from = saved[-1]
    state = torch.load(checkpoints / f"step_{resume_from:06d}.pt", weights_only=True)

    # the same stage again, now in one process: it resumes from the two-process checkpoint
    capsys.readouterr()
    assert train.main(args) == 0
    curve = pd.read_csv(work / "out" / "curve.csv")
    assert list(curve["step"]) == list(range(1, steps + 1))
    for row, saved_row in zip(curve.head(resume_from).to_dict("records"), state["curve"]):
        assert row["loss_lower"] == pytest.approx(saved_row["loss_lower"], rel=1e-6)  # kept from before the kill

    # and it ends where an uninterrupted one-process run ends (float32 rounding apart)
    reference = _stage_args(tiny_project, work, "reference", "--variant", "cpcsam")
    assert train.main(reference) == 0
    ref = pd.read_csv(work / "reference" / "curve.csv")
    for column in ("loss_lower", "loss_upper"):
        assert (curve[column] - ref[column]).abs().max() <= 2e-3 * ref[column].abs().max(), column

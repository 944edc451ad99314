"""Running the trainer on several CPU processes (gloo) from a test, and the same cases in one process.

`spawn_cases(cases, project, world_size)` starts `world_size` processes (torch.multiprocessing,
spawn), each joining a gloo group on a free local port and running every case of `cases`;
`run_cases(cases, project)` runs them here, in one process, without a process group. A case
trains a few steps and returns what the tests compare: the per-step metrics, the trainable
weights after the steps, and (bi-level cases) which parameters each level's step changed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cpcsam.training.distributed import SINGLE, World, all_gather_objects, process_group
from training_helpers import trainer_from_dicts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def project_files(project: dict[str, Any]) -> dict[str, Any]:
    """What a spawned process needs of the `tiny_project` fixture (paths and the params dict)."""
    return {"root": str(project["root"]), "params": copy.deepcopy(project["params"]),
            "sam": str(project["sam_checkpoint"])}


@contextlib.contextmanager
def _planted(bug: str | None):
    """A deliberately broken trainer, to show that the comparison catches it."""
    if bug is None:
        yield
        return
    import cpcsam.training.bilevel as bilevel

    saved = {name: getattr(bilevel, name) for name in ("all_reduce_gradients", "sum_over_ranks")}
    if bug == "no-gradient-all-reduce":  # each rank steps on its own slice's gradient
        bilevel.all_reduce_gradients = lambda params, world: None
    elif bug == "no-cross-terms":  # unrolled: v not summed, so the cross-rank terms J_r^T v_s vanish
        original = saved["sum_over_ranks"]
        calls = {"n": 0}

        def partial(tensors, like, world):
            calls["n"] += 1
            return list(tensors) if calls["n"] % 2 == 0 else original(tensors, like, world)

        bilevel.sum_over_ranks = partial
    else:
        raise ValueError(bug)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(bilevel, name, value)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_case(case: dict[str, Any], files: dict[str, Any], world: World) -> dict[str, Any]:
    params = copy.deepcopy(files["params"])
    params["model"]["capl"]["mode"] = case.get("capl", "causal")
    root = Path(files["root"])
    manifest = pd.read_parquet(root / "manifest.parquet")
    prompts = pd.read_parquet(root / "prompts.parquet")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_planted(case.get("bug")))
        trainer = trainer_from_dicts(params, manifest, prompts, files["sam"], case.get("out"),
                                     train_overrides=case.get("train", {}))
        if case.get("float64"):
            _to_float64(trainer)
            stack.enter_context(_float64_losses())
        grads = _record_gradients(trainer)
        initial = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()
                   if n in set(trainer._trainable_names())}
        if case.get("out"):
            trainer.run(resume=case.get("resume", True), progress=False)
            metrics = [{k: v for k, v in row.items()} for row in trainer.curve]
        else:
            metrics = [trainer.train_step() for _ in range(case.get("steps", 3))]
        isolation = _isolation(trainer) if case.get("isolation") else None
    trainable = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()
                 if n in set(trainer._trainable_names())}
    digests = all_gather_objects(_digest(trainable), world)
    return {"metrics": metrics, "initial": initial, "trainable": trainable, "images_seen": trainer.images_seen, "gradients": grads,
            "same_on_every_rank": len(set(digests)) == 1, "isolation": isolation, "world": world.size}


def _record_gradients(trainer) -> dict[str, list[torch.Tensor]]:
    """Each level's gradient as its optimiser steps with it (summed over ranks, clipped), per step."""
    seen: dict[str, list[torch.Tensor]] = {"upper": [], "lower": []}
    for level, optimizer, params in (("upper", trainer.opt_upper, trainer.upper_params),
                                     ("lower", trainer.opt_lower, trainer.lower_params)):
        if optimizer is None:
            continue

        def step(*args, _step=optimizer.step, _level=level, _params=params, **kwargs):
            seen[_level].append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                                           for _, p in _params]).cpu().clone())
            return _step(*args, **kwargs)

        optimizer.step = step
    return seen


@contextlib.contextmanager
def _float64_losses():
    """`Tensor.float()` leaves float64 as it is (the losses upcast with `.float()`), as in the
    finite-difference test of test_bilevel.py."""
    original = torch.Tensor.float

    def float_(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = float_
    try:
        yield
    finally:
        torch.Tensor.float = original


def _to_float64(trainer) -> None:
    """The whole computation in float64: rounding noise ~1e-16, so a correct reduction matches one
    process to ~1e-12 even after Adam (which blows float32 noise on near-zero gradient entries up
    to a sizeable fraction of the learning rate)."""
    import dataclasses

    trainer.model.double()
    trainer.model.sam.prompt_encoder.pe_layer.float()  # SAM builds its PE grid in float32 (frozen constants)
    trainer.batch_hook = lambda step, level, batch: dataclasses.replace(
        batch, inputs=batch.inputs.double(), targets=batch.targets.double())


def _isolation(trainer) -> dict[str, Any]:
    """Which parameters one upper step and one lower step change, and which get gradients."""
    def snapshot():
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def changed(before):
        return sorted(n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach()))

    step = trainer.step + 1
    before = snapshot()
    trainer.upper_step(trainer._next(trainer.upper_stream, "upper", step))
    upper = {"changed": changed(before), "with_grad": sorted(n for n, p in trainer.model.named_parameters()
                                                             if p.grad is not None)}
    before = snapshot()
    trainer.lower_step(trainer._next(trainer.lower_stream, "lower", step), step)
    lower = {"changed": changed(before), "with_grad": sorted(n for n, p in trainer.model.named_parameters()
                                                             if p.grad is not None)}
    return {"upper": upper, "lower": lower}


def run_cases(cases: list[dict[str, Any]], files: dict[str, Any], world: World = SINGLE) -> list[dict[str, Any]]:
    return [run_case(case, files, world) for case in cases]


def run_pretrain_cases(cases: list[dict[str, Any]], files: dict[str, Any], world: World = SINGLE) -> list[dict[str, Any]]:
    return [pretrain_case(files, case.get("pretrain", {}), world, case.get("bug")) for case in cases]


def _worker(rank: int, world_size: int, port: int, runner: str, cases: list[dict[str, Any]], files: dict[str, Any],
            result: str) -> None:
    """One rank: join a gloo group on `port`, run `cases` with the module function `runner`; rank 0 saves."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    with process_group("gloo", torch.device("cpu")) as world:
        results = globals()[runner](cases, files, world)
    if rank == 0:
        torch.save(results, result)


def _spawn(runner: str, cases: list[dict[str, Any]], files: dict[str, Any], world_size: int,
           tmp: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    result = tmp / f"{runner}.pt"
    mp.start_processes(_worker, args=(world_size, free_port(), runner, cases, files, str(result)), nprocs=world_size,
                       start_method="spawn")
    return torch.load(result, weights_only=False)


def spawn_cases(cases: list[dict[str, Any]], files: dict[str, Any], world_size: int, tmp: Path) -> list[dict[str, Any]]:
    """Run `cases` on `world_size` gloo processes; rank 0's results."""
    return _spawn("run_cases", cases, files, world_size, tmp)


def pretrain_case(files: dict[str, Any], update: dict[str, Any], world: World,
                  bug: str | None = None) -> dict[str, Any]:
    """A few pretraining steps (`cpcsam.training.pretrain`) from the tiny project's SAM, float32:
    the per-step curve, the weights after them, and whether every rank holds the same weights."""
    from cpcsam.config import PretrainConfig
    from cpcsam.training import pretrain

    params = copy.deepcopy(files["params"])
    cfg = PretrainConfig.from_params({**params["pretrain"], "steps": 3, "batch_images": 3, "val_every": 0,
                                      "init": files["sam"], "mask_loss": "bce_dice", "corrective_clicks": 2, "prompt_slots": 9,
                                      "optim": {"lr": 1e-3, "warmup_steps": 0}, **update})
    saved = pretrain.all_reduce_gradients, pretrain._skip_draws
    if bug == "no-gradient-all-reduce":  # each rank steps on its own scenes' gradient
        pretrain.all_reduce_gradients = lambda params, world: None
    elif bug == "no-click-skip":  # every rank draws its clicks from the start of the step's stream
        pretrain._skip_draws = lambda gen, count: None
    try:
        sam, metrics = pretrain.pretrain_sam(params["model"], cfg, None, progress=False)
    finally:
        pretrain.all_reduce_gradients, pretrain._skip_draws = saved
    weights = {n: t.detach().clone() for n, t in sam.state_dict().items()}
    digests = all_gather_objects(_digest(weights), world)
    return {"weights": weights, "first": metrics["first"], "final": metrics["final"],
            "same_on_every_rank": len(set(digests)) == 1, "world": world.size}


def spawn_pretrain_cases(cases: list[dict[str, Any]], files: dict[str, Any], world_size: int,
                         tmp: Path) -> list[dict[str, Any]]:
    """`pretrain_case` for each of `cases` on `world_size` gloo processes; rank 0's results."""
    return _spawn("run_pretrain_cases", cases, files, world_size, tmp)

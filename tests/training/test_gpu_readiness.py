"""What the GPU paths need, checked on the CPU: encoder gradient checkpointing (same gradients, less
kept activation), the GPU smoke benchmark's clean skip without a GPU, device placement helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpcsam.training.device import resolve_device
from cpcsam.training.distributed import SINGLE, World, rank_device, resolve_backend, shard_range
from cpcsam.training.recompute import checkpointed_encoder
from training_helpers import trainer_from_dicts

ROOT = Path(__file__).resolve().parents[2]


def _trainer(project, params, **overrides):
    return trainer_from_dicts(params, project["manifest"], project["prompts"], project["sam_checkpoint"], None,
                              train_overrides=overrides)


def test_checkpointed_encoder_gives_the_same_output_and_gradients(tiny_project, tiny_params) -> None:
    trainer = _trainer(tiny_project, tiny_params, mode="full-finetune")  # every encoder weight trains
    encoder = trainer.model.sam.image_encoder
    images = trainer.lower_stream.next().inputs
    results = []
    for checkpointed in (False, True):
        encoder.zero_grad(set_to_none=True)
        out = checkpointed_encoder(encoder, images) if checkpointed else encoder(images)
        (out.square().mean() + out.mean()).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    assert torch.equal(plain, ckpt)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == len(list(encoder.parameters()))
    worst = max(float((plain_grads[n] - ckpt_grads[n]).abs().max()) for n in plain_grads)
    assert worst == 0.0  # on the CPU the recomputation runs the same kernels on the same inputs
    with torch.no_grad():  # no graph, no checkpoint: the plain forward
        assert torch.equal(checkpointed_encoder(encoder, images), plain)


@pytest.mark.parametrize("mode", ["lora-only", "full-finetune"])
def test_training_with_grad_checkpointing_is_the_same_training(tiny_project, tiny_params, mode) -> None:
    tiny_params["model"]["capl"]["mode"] = "fixed"
    weights = []
    for checkpointing in (False, True):
        trainer = _trainer(tiny_project, tiny_params, mode=mode, steps=2, grad_checkpointing=checkpointing)
        calls = []
        if checkpointing:
            import cpcsam.training.bilevel as bilevel

            original = bilevel.checkpointed_encoder
            bilevel.checkpointed_encoder = lambda enc, x: calls.append(1) or original(enc, x)
        try:
            trainer.run(resume=False, progress=False)
        finally:
            if checkpointing:
                bilevel.checkpointed_encoder = original
        assert len(calls) == (2 if checkpointing else 0)  # one encoder pass per LoRA/SAM step
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_grad_checkpointing_and_processes_are_not_part_of_the_run_fingerprint(tiny_project, tiny_params) -> None:
    """A checkpoint resumes with checkpointing switched or with another number of processes."""
    plain = _trainer(tiny_project, tiny_params)
    switched = _trainer(tiny_project, tiny_params, grad_checkpointing=True,
                        distributed={"nproc_per_node": 4, "backend": "gloo"})
    other = _trainer(tiny_project, tiny_params, steps=5)
    assert plain.fingerprint == switched.fingerprint != other.fingerprint


def test_gpu_smoke_skips_cleanly_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the smoke benchmark would run for real")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU: skipped" in proc.stdout


def test_device_and_backend_choice() -> None:
    cpu = resolve_device("cpu")
    assert resolve_backend("auto", cpu) == "gloo" and resolve_backend("gloo", cpu) == "gloo"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    with pytest.raises(Exception, match="nccl needs CUDA"):
        resolve_backend("nccl", cpu)
    # one GPU per process: `cuda` means this rank's GPU in a multi-process job
    assert rank_device(torch.device("cuda"), World(rank=3, size=4, local_rank=1)) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda"), SINGLE) == torch.device("cuda")
    assert rank_device(torch.device("cuda", 0), World(1, 2, 1)) == torch.device("cuda", 0)  # explicit wins
    assert rank_device(cpu, World(1, 2, 1)) == cpu


@pytest.mark.parametrize("count, size", [(5, 2), (2, 2), (7, 3), (4, 4)])
def test_shards_cover_the_batch_in_order(count, size) -> None:
    ranges = [shard_range(count, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_batch_to_cpu_keeps_the_tensors(tiny_project, tiny_params) -> None:
    trainer = _trainer(tiny_project, tiny_params)
    batch = trainer.lower_stream.next()
    moved = batch.to(torch.device("cpu"))
    assert moved.inputs is batch.inputs and moved.targets is batch.targets  # no copy, no pinning on the CPU

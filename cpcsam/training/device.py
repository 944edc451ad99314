"""Device and thread selection for the stages that run torch (their sections live in `cpcsam.config`)."""

from __future__ import annotations

import torch

from cpcsam.errors import ConfigError


def apply_threads(threads: int) -> None:
    """`torch.set_num_threads(threads)` when > 0 (called by components, which own the process).

    The default of every stage is 1: on a 2-core machine shared with anything else, two OpenMP
    threads per process spin-wait on each other and a training step fell from 3.3/s to 0.14/s;
    one thread per process loses little alone and nothing under load (benchmarks/bench_threads.py).
    """
    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; anything else is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"params device: {name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"params device: {name!r} requested but CUDA is not available (use device: auto)")
    return device


def configure_cuda(device: torch.device) -> None:
    """Per-process CUDA settings for training on `device` (nothing on other devices).

    - The process's current device is `device`, so that kernels and allocations without an
      explicit device (autocast, GradScaler, library internals) land on it and not on cuda:0,
      which every process of a multi-GPU job would otherwise share.
    - `cudnn.benchmark`: the input shapes are fixed (one image size, fixed prompt slots), so
      cuDNN's autotuning of the encoder's and the decoder's convolutions pays after one step. It
      is one more source of run-to-run differences on CUDA, which is not bit-deterministic anyway.
    TF32 for float32 matmuls stays at torch's default (off): it would change the numbers that the
    CPU runs and the ONNX parity check are compared against.
    """
    if device.type != "cuda":
        return
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True

"""Device and thread selection for the stages that run torch (their sections live in `cpcsam.config`)."""

from __future__ import annotations

import torch

from cpcsam.errors import ConfigError


def configure_process(threads: int, large_blocks_from_heap: bool = False) -> None:
    """The CPU settings of a process that runs torch work (called by components, which own it):
    `torch.set_num_threads(threads)` when > 0, and freed memory kept for reuse (`keep_freed_memory`;
    `large_blocks_from_heap`: blocks of every size, for inference and for training with a frozen
    image encoder), and subnormal floats flushed to zero (`flush_subnormals`).

    The default of every stage is 1 thread: on a 2-core machine shared with anything else, two
    OpenMP threads per process spin-wait on each other and a training step fell from 3.3/s to
    0.14/s; one thread per process loses little alone and nothing under load
    (benchmarks/bench_threads.py).
    """
    if threads > 0:
        torch.set_num_threads(threads)
    keep_freed_memory(large_blocks_from_heap)
    flush_subnormals()


def flush_subnormals() -> None:
    """Treat float32 values below 1.2e-38 as zero, in this process's arithmetic from now on.

    A training step's backward pass makes subnormal gradients (tiny attention probabilities times
    tiny upstream gradients), and on Intel cores every multiply that touches one takes a slow
    microcode path: a [512, 512] product of subnormals took 423 ms instead of 1.8 ms (one thread,
    Intel Xeon, AVX-512). Measured on the embedded default's training stage, profiled over ten
    steps: the encoder's attention products (`bmm`) took 571 ms without the flush and 206 ms
    with it, and a process of 45 steps 0.87× the wall time (median of six alternating pairs).
    On an AMD EPYC host the same steps had taken about half the Intel host's time; how much
    subnormals cost there was not measured. A weight updated by a value this small does not
    change (float32 resolves 1 part in 2^24 of it), so nothing the training can register is
    lost; onnxruntime offers the same switch (`session.set_denormal_as_zero`). torch's switch
    also reaches its OpenMP worker threads (the same product on two threads: 230 ms → 1.3 ms).
    Not x86 (no SSE control register): `set_flush_denormal` returns False and nothing changes.
    """
    torch.set_flush_denormal(True)


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MAX_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory(large_blocks_from_heap: bool = False) -> None:
    """Make glibc's malloc keep the memory torch frees for reuse instead of handing it back.

    torch allocates CPU tensors with malloc. glibc serves a large block with a fresh mmap (above a
    threshold that starts at 128 KiB and only adapts as blocks are freed), unmaps it when freed,
    and trims free memory at the top of its heap, so a training step faulted in and zeroed much of
    its activation memory anew, page by page (a cached ViT-B decoder step: 18,000–34,000 page
    faults, 10–15 % of its CPU time in the kernel). With the threshold fixed at its maximum
    (32 MiB) and trimming off (-1, mallopt(3)), blocks below it come from the heap the previous
    step left.

    Larger blocks are still mapped and unmapped each time, and a cached ViT-B step with 4 entities
    per image has several of exactly 32 MiB (the upscaled features, [4 · 16·HW, 32] floats): 5,800–
    12,700 page faults and 22–79 ms of kernel time per step remained, a step took 0.237–0.287 s.
    `large_blocks_from_heap` turns mmap off (M_MMAP_MAX = 0), so that every block comes from the
    heap: 0–1,024 faults, 0.207–0.220 s per step (six processes each, alternating).

    The ViT-B encoder's global-attention blocks hold 12 × 4096² floats (805 MB) per product, softmax
    and added position bias: mapped afresh, one forward pass faulted in about 10 GB. From the heap
    it faults nothing after the first image, and a forward pass without gradients took 8.0 s
    instead of 13–17 s at the same peak RSS (3.5 GB), but only with trimming off: the threshold
    used before (2**31 - 1, the largest positive int) still let glibc return what was free at the
    heap's top after each global block (2.36 M faults, 9.7 GB, a pass: 13.3–13.8 s). So the stages
    that run models without gradients (embed, evaluate, export) and `cpcsam predict --backend torch`
    ask for it, and the training stage when its image encoder is frozen (`configure_training_process`).
    Not a training step with gradients through the encoder: a heap that never returns its large
    blocks fragments when their sizes vary, and with the ViT-B encoder in the step (LoRA on its
    qkv) the process's peak RSS rose from 8.7–8.9 to 15.9–16.1 GB (measured with the earlier trim
    threshold).
    Not glibc (macOS, musl): nothing to do.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # never trim (mallopt(3)); glibc reads it as the largest size_t
    if large_blocks_from_heap:
        libc.mallopt(_M_MMAP_MAX, 0)


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

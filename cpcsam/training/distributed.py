"""Data-parallel training over `torch.distributed`, shaped for the bi-level trainer.

The processes are started by torchrun (`components.cli` re-launches a stage under it when
`train.distributed.nproc_per_node` > 1); each one joins the job with `process_group`, which reads
torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR/PORT`). With one process
nothing here communicates and no process group exists.

Why explicit all-reduces and not `DistributedDataParallel`:
- A bi-level iteration runs two backward passes over two disjoint parameter subsets (CaPL on the
  upper step, LoRA or SAM on the lower step) of one module, with `requires_grad` switched between
  them. DDP registers its reducer once for every parameter that requires grad at wrap time; a
  backward that leaves a registered parameter without a gradient stalls its buckets ("Expected to
  have finished reduction in the prior iteration"), and `find_unused_parameters=True` would still
  all-reduce the other level's (absent) gradients and traverse the graph every step.
- The unrolled hypergradient differentiates through a gradient (`create_graph=True`) and evaluates
  the upper loss with `torch.func.functional_call` at θ' = θ − η∇θ: DDP's hooks fire on the inner
  `autograd.grad` and know nothing of the substituted parameters.
So each level's step all-reduces exactly the gradients of the parameters it updates
(`all_reduce_gradients`, one flat buffer per ~64 MB bucket) after its backward and before
unscaling, clipping and the optimiser step; the other level's parameters never enter a
collective. The price is DDP's overlap of communication with the backward pass, which matters
little here: the trainable sets are small (LoRA, CaPL), and full fine-tuning of a ViT-B
all-reduces ~90 M floats once per step.

Reductions are sums of *local contributions*: a rank's loss is its entities' share of the global
mean, `Σ_local ℓ / N_global` (the per-rank entity counts may differ), so the sum over ranks of
the per-rank gradients is the gradient of the single-process loss on the same global batch.
`global_sum` gives the loss *value* over all ranks (every rank sees the same number, so every
rank takes the same NaN decision) while its gradient stays the local contribution.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from cpcsam.errors import ConfigError

logger = logging.getLogger(__name__)

# Elements per all-reduce buffer (float32: 64 MB); bounds the extra memory of flattening.
BUCKET_ELEMENTS = 1 << 24
# A rank waits this long in a collective for a peer before failing (a peer that dies is seen at
# once: torchrun stops the others; this bounds a peer that hangs).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank, number of processes, rank on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, outs, metrics and MLflow logs."""
        return self.rank == 0


SINGLE = World()


def current_world() -> World:
    """The initialised process group's world, or `SINGLE` when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        return World(rank, torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    return SINGLE


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (or another launcher) for this process; 1 outside one."""
    if "RANK" not in os.environ:
        return 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from exc


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` → nccl for CUDA devices, gloo otherwise; nccl without CUDA is refused."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"train.distributed.backend: nccl needs CUDA devices, but training runs on {device}")
    return backend


def rank_device(device: torch.device, world: World) -> torch.device:
    """One GPU per process: `cuda` becomes `cuda:<local rank>` in a multi-process job."""
    if device.type == "cuda" and world.distributed and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


@contextlib.contextmanager
def process_group(backend: str, device: torch.device) -> Iterator[World]:
    """Join the launcher's job for the duration of the block (nothing to join with one process).

    `device` is the stage's resolved device (it picks `auto` → nccl/gloo and binds this process
    to its GPU). The group is destroyed on the way out, also on errors.
    """
    size = launched_world_size()
    if size <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield current_world()
        return
    if not torch.distributed.is_available():
        raise ConfigError("train.distributed: this torch build has no torch.distributed")
    name = resolve_backend(backend, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_id = None
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"train.distributed: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "set nproc_per_node to at most the number of GPUs"
            )
        device_id = torch.device("cuda", local_rank)
        torch.cuda.set_device(device_id)
    torch.distributed.init_process_group(backend=name, timeout=COLLECTIVE_TIMEOUT, device_id=device_id)
    world = current_world()
    logger.info("process group: rank %d of %d (%s, %s)", world.rank, world.size, name, rank_device(device, world))
    try:
        yield world
    finally:
        torch.distributed.destroy_process_group()


# ---- collectives ---------------------------------------------------------------------------------


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in the forward pass, identity in the backward pass (twice differentiable)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.detach().clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def global_sum(local: Tensor, world: World) -> Tensor:
    """The sum of `local` over ranks as a value; its gradient is that of the local term alone.

    Used on local contributions to a global mean: every rank gets the global value (for the
    nonlinear parts of a loss, e.g. the variance over prompt groups, and for logging), and the
    gradients, summed over ranks afterwards by `all_reduce_gradients`, are the exact gradient.
    """
    if not world.distributed:
        return local
    return _SumOverRanks.apply(local)


def sum_over_ranks(tensors: Sequence[Tensor | None], like: Sequence[Tensor], world: World) -> list[Tensor | None]:
    """Element-wise sums over ranks of a list of tensors (new tensors; `like[i]` gives shape/dtype).

    A `None` counts as zeros where another rank has a tensor, and stays `None` where every rank
    has `None` (so a parameter no rank used keeps `grad = None`, as it would in one process, and
    AdamW leaves it alone).
    """
    if not world.distributed or not tensors:
        return list(tensors)
    device = like[0].device
    present = torch.tensor([t is not None for t in tensors], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(present)
    filled = [
        (t.detach() if t is not None else torch.zeros_like(ref)) if flag > 0 else None
        for t, ref, flag in zip(tensors, like, present.tolist())
    ]
    positions = [i for i, t in enumerate(filled) if t is not None]
    reduced: list[Tensor] = []
    for bucket in _buckets([filled[i] for i in positions]):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in bucket:
            reduced.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    for i, t in zip(positions, reduced):
        filled[i] = t
    return filled


def _buckets(tensors: list[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive runs of same-dtype tensors with at most `BUCKET_ELEMENTS` elements (or one tensor)."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() > BUCKET_ELEMENTS or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def all_reduce_gradients(params: Sequence[nn.Parameter], world: World) -> None:
    """Sum the `.grad` of exactly `params` over ranks, in place (see `sum_over_ranks` for None)."""
    if not world.distributed:
        return
    reduced = sum_over_ranks([p.grad for p in params], list(params), world)
    for p, g in zip(params, reduced):
        p.grad = g


def broadcast_module(module: nn.Module, world: World, src: int = 0) -> None:
    """Every parameter and buffer of `module` from rank `src` (as DDP does when it wraps a model)."""
    if not world.distributed:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(tensor.data, src=src)


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """A picklable object from rank `src` to every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def shard_range(count: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `count` items for `rank` of `size` (sizes differ by at most 1, larger first)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)

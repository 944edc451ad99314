"""The bi-level trainer of CPC-SAM (docs/METHOD.md §4) and its fair baselines.

Modes (`train.mode`):

- `bilevel`: each iteration first updates CaPL (φ) on a batch from image half A with SAM frozen,
  `L_upper = Eq. 1 + λ·Eq. 2`, then updates SAM's LoRA (θ) on a batch from half B with CaPL
  frozen, `L_lower = Eq. 3`. First-order by default; `hypergradient: unrolled` replaces the
  CaPL gradient by the one-step hypergradient d L_upper(φ, θ − η ∇θ L_lower(θ, φ)) / dφ
  (`torch.func.functional_call`).
- `lora-only`: SAMed-style: only the LoRA step, on all training images, plain prompts.
- `full-finetune`: every SAM weight except the prompt encoder, on all images, plain prompts.

What the upper loss is per prompt-embedding ablation (`model.capl.mode`):
`learnable` (soft prompt) — mean over the K groups of L_seg (an ordinary prompt-tuning loss);
`task` — Eq. 1; `causal` — Eq. 1 + λ·Eq. 2; `entity` (*ours*, the entity module without the task
module) — Eq. 1 + λ·Eq. 2 as well, the K groups reaching the decoder uncalibrated;
`fixed` has no CaPL parameters, so bilevel degenerates to the LoRA step alone.

Costs kept down on purpose: the CaPL step runs the image encoder under `no_grad` (SAM is frozen
there, so no encoder graph is kept) and the prompt encoder (always frozen) under `no_grad`;
the LoRA step runs the encoder with autograd only if it carries trainable weights, and reads
cached embeddings when it has none (`embed` stage). Parameters of the level that is not being
trained have `requires_grad=False` during the other level's step, so autograd never computes
their gradients (gradient isolation is structural, not just "the other optimiser did not step").

Determinism: every batch and every random choice is a pure function of (seed, step) or of the
batch streams' positions; RNG states, stream positions, optimisers and schedulers go into the
checkpoints, so a killed run resumes to the same numbers.

Several processes (`cpcsam.training.distributed`, launched by torchrun): every rank walks the same
batch streams and takes its contiguous slice of each global batch, so N processes compute the
single-process step of the same global batch. Each rank's losses are its entities' share of the
global means (`global_sum`: the value is global, the gradient local) and each level's step sums
exactly its own parameters' gradients over the ranks before clipping and stepping; every rank
then holds the same weights, optimiser and stream states. Rank 0 alone writes checkpoints,
outs and metrics; every rank resumes from the checkpoint rank 0 picks, whatever the number of
processes that wrote it. One process runs exactly the single-process code (no collective, the
same bytes as before). With `model.lora.dropout` > 0 the dropout masks differ from a single
process's (each rank draws its own), which changes the numbers but not their distribution.
"""

from __future__ import annotations

import contextlib
import csv
import copy
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from cpcsam.errors import CheckpointError, ConfigError
from cpcsam.training.checkpoint import latest_checkpoint, latest_matching, load_checkpoint, save_checkpoint
from cpcsam.config import TrainConfig
from cpcsam.files import write_json_atomic
from cpcsam.training.device import configure_cuda, resolve_device
from cpcsam.training.distributed import (
    all_reduce_gradients,
    barrier,
    broadcast_module,
    broadcast_object,
    current_world,
    global_sum,
    rank_device,
    sum_over_ranks,
)
from cpcsam.training.errors import NonFiniteLossError
from cpcsam.training.data import Batch, BatchStream, PromptProvider, TrainingImages, split_halves, stream_rng
from cpcsam.training.metric_logger import MetricLogger, NullLogger
from cpcsam.training.recompute import checkpointed_encoder
from cpcsam.training.losses import (
    entity_attention_map,
    entity_loss,
    sam_loss,
    seg_loss_logits,
    seg_loss_probs,
    task_loss,
    task_loss_from_groups,
)

logger = logging.getLogger(__name__)

CURVE_FIELDS = [
    "step",
    "loss_upper",
    "task_mean",
    "task_var",
    "entity_attention",
    "calibration_l1",
    "loss_lower",
    "lr_capl",
    "lr_sam",
    "grad_norm_capl",
    "grad_norm_sam",
]


class _NonFinite(Exception):
    def __init__(self, what: str, value: float) -> None:
        super().__init__(what)
        self.what = what
        self.value = value


def _finite(value: Tensor) -> bool:
    return bool(torch.isfinite(value).all())


class _Objective(nn.Module):
    """Wraps the model so that `torch.func.functional_call` can swap θ for θ' in a whole loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Batch], tuple[Tensor, dict[str, Tensor]]]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self._loss_fn(batch)


class Trainer:
    """Runs `cfg.steps` iterations of the chosen mode, checkpointing and resuming.

    `model` is a `cpcsam.modeling.CPCSAM`, already carrying LoRA adapters in the `bilevel` and
    `lora-only` modes (see `cpcsam.training.run.build_training_model`). `out_dir` receives
    `curve.csv` and `metrics.json`; checkpoints and `timing.json` go to `checkpoint_dir` (default
    `out_dir/checkpoints`; the pipeline keeps them outside its outs, whose bytes must not depend
    on wall time); `fingerprint` identifies the run's inputs so that a checkpoint of another
    configuration is never resumed.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        data: TrainingImages,
        prompts: PromptProvider,
        out_dir: str | Path | None = None,
        metric_logger: MetricLogger | None = None,
        fingerprint: str = "",
        checkpoint_dir: str | Path | None = None,
    ) -> None:
        from cpcsam.modeling import capl_parameters

        self.cfg = cfg
        self.data = data
        self.prompts = prompts
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.world = current_world()
        # Rank 0 alone logs (and writes: see `save`, `write_outputs`).
        self.metric_logger = (metric_logger or NullLogger()) if self.world.is_main else NullLogger()
        self.fingerprint = fingerprint
        self.device = rank_device(resolve_device(cfg.device), self.world)
        configure_cuda(self.device)
        self.model = model.to(self.device)
        self.model.train()
        # Called with (step, level, batch) before a batch is used; returns the batch to use.
        # A test seam (e.g. to poison a batch); None in normal runs.
        self.batch_hook: Callable[[int, str, Batch], Batch] | None = None

        names = {id(p): n for n, p in self.model.named_parameters()}
        capl = capl_parameters(self.model)
        self.upper_params: list[tuple[str, nn.Parameter]] = (
            [(names[id(p)], p) for p in capl] if cfg.mode == "bilevel" else []
        )
        if cfg.mode != "bilevel" and capl:
            raise ConfigError(
                f"train.mode {cfg.mode}: baselines train no CaPL; build the model with model.capl.mode = fixed"
            )
        self.lower_params = self._select_lower_params()
        if not self.lower_params:
            raise ConfigError(
                f"train.mode {cfg.mode}: the model has no trainable SAM weights (LoRA adapters missing?)"
            )
        for param in self.model.parameters():
            param.requires_grad_(False)
        self._set_trainable(upper=False, lower=True)
        self.encoder_trainable = any(p.requires_grad for p in self.model.sam.image_encoder.parameters())
        if data.uses_embeddings and self.encoder_trainable:
            raise ConfigError(
                "train: cached image embeddings need a frozen image encoder, but this mode trains it "
                f"(mode {cfg.mode}, LoRA targets including the encoder qkv); set train.embedding_cache: off"
            )

        self.opt_upper = self._optimizer(self.upper_params, cfg.capl_optim) if self.upper_params else None
        self.opt_lower = self._optimizer(self.lower_params, cfg.sam_optim)
        self.sched_upper = self._scheduler(self.opt_upper, cfg.capl_optim) if self.opt_upper else None
        self.sched_lower = self._scheduler(self.opt_lower, cfg.sam_optim)
        self.amp_dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        # float16 needs loss scaling (bfloat16 has float32's range). One scaler for both levels: a
        # step whose gradients overflow is skipped and halves the scale for the next backward.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp and self.device.type == "cuda")
        self.grad_checkpointing = bool(cfg.grad_checkpointing)

        if self.upper_params:
            half_a, half_b = split_halves(data.image_ids, cfg.seed, data.sources)
            upper_entities = cfg.upper_max_entities or cfg.max_entities
            self.upper_stream: BatchStream | None = BatchStream(
                data, prompts, half_a, cfg.batch_images, upper_entities, cfg.seed, "upper"
            )
            self.lower_stream = BatchStream(data, prompts, half_b, cfg.batch_images, cfg.max_entities, cfg.seed, "lower")
        else:
            self.upper_stream = None
            self.lower_stream = BatchStream(
                data, prompts, data.image_ids, cfg.batch_images, cfg.max_entities, cfg.seed, "lower"
            )
        for stream in (self.upper_stream, self.lower_stream):
            if stream is not None and stream.images_per_batch < self.world.size:
                raise ConfigError(
                    f"train: {self.world.size} processes share each global batch, but the {stream.name} level's "
                    f"batches hold {stream.images_per_batch} images (train.batch_images, or the images of its "
                    "half); use at least one image per process"
                )
        # Every rank starts from rank 0's weights (they are built from the same seed and file, so
        # this is insurance, as in DDP's constructor).
        broadcast_module(self.model, self.world)
        self.step = 0
        self.curve: list[dict[str, float]] = []
        self.images_seen = 0
        self.seconds = 0.0

    # ---- parameter groups ---------------------------------------------------------------------

    def _select_lower_params(self) -> list[tuple[str, nn.Parameter]]:
        named = list(self.model.named_parameters())
        if self.cfg.mode == "full-finetune":
            # All SAM weights except the prompt encoder (frozen in every mode, as in SAMed/BLO-SAM).
            return [
                (n, p)
                for n, p in named
                if n.startswith("sam.") and not n.startswith("sam.prompt_encoder.") and "lora_" not in n
            ]
        return [(n, p) for n, p in named if "lora_" in n]

    def _set_trainable(self, upper: bool, lower: bool) -> None:
        for _, p in self.upper_params:
            p.requires_grad_(upper)
        for _, p in self.lower_params:
            p.requires_grad_(lower)

    def _optimizer(self, params: list[tuple[str, nn.Parameter]], cfg) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for _, p in params], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def _scheduler(self, optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
        total = self.cfg.steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step, total))

    # ---- forward pieces -----------------------------------------------------------------------

    def _autocast(self):
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _image_embeddings(self, batch: Batch, grad: bool, checkpoint: bool = False) -> Tensor:
        """The batch's image embeddings (cached, or the encoder's output). `checkpoint`: recompute
        the encoder blocks in the backward pass (`train.grad_checkpointing`), only where it is safe:
        not inside `functional_call` (the recomputation would run after the substituted θ' are
        gone) and only when the encoder builds a graph at all."""
        if batch.is_embedding:
            return batch.inputs
        grad = grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            if checkpoint and grad and self.grad_checkpointing:
                return checkpointed_encoder(self.model.sam.image_encoder, batch.inputs)
            return self.model.encode_images(batch.inputs)

    def _entity_mean(self, values: Tensor, batch: Batch, rows_per_entity: int = 1) -> Tensor:
        """Mean over the global batch's entities (× `rows_per_entity` rows each) of per-row values.

        A whole batch: `values.mean()` (the single-process expression, same bits). A rank's slice:
        its share `Σ values / (rows of the global batch)`, summed over ranks in value only
        (`global_sum`), so that the gradients of the ranks add up to the single-process one.
        """
        if not batch.sharded:
            return values.mean()
        return global_sum(values.sum() / (batch.global_entities * rows_per_entity), self.world)

    def _mean_of_rows(self, mean: Tensor, batch: Batch) -> Tensor:
        """A mean over this rank's rows (e.g. the calibration L1) made a mean over the global batch's."""
        if not batch.sharded:
            return mean
        return global_sum(mean * (batch.num_entities / batch.global_entities), self.world)

    def _sparse(self, batch: Batch) -> Tensor:
        """Prompt-encoder tokens of all K prompts, [N, K, P, C] (the prompt encoder is frozen)."""
        n, k, p = batch.labels.shape
        with torch.no_grad():
            sparse = self.model.embed_prompts(batch.coords.reshape(n * k, p, 2), batch.labels.reshape(n * k, p))
        return sparse.reshape(n, k, p, -1)

    def upper_loss(self, batch: Batch, embeddings: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """CaPL's objective on a batch (Eq. 1 + λ·Eq. 2 in `causal` and `entity` modes; see the module doc)."""
        if embeddings is None:
            embeddings = self._image_embeddings(batch, grad=self.encoder_trainable)
        n, k, p = batch.labels.shape
        calibrated = self.model.calibrate_prompts(self._sparse(batch), batch.labels, batch.coords, embeddings,
                                                  batch.image_index)
        out = self.model.decode(
            embeddings, batch.image_index.repeat_interleave(k), calibrated.reshape(n * k, p, -1)
        )
        targets = batch.targets.repeat_interleave(k, dim=0)
        per_prompt = seg_loss_logits(out.low_res_logits[:, 0], targets).reshape(n, k)
        capl = self.model.capl
        # Eq. 1's variance term belongs to the causal modules (task, entity), not to a soft prompt.
        beta = self.cfg.beta_variance if capl.task is not None or capl.entity is not None else 0.0
        if not batch.sharded:
            l_task, mean, var = task_loss(per_prompt, beta)
        else:
            # The K group means over the global batch's entities; the variance term is nonlinear in
            # them, so it is taken on the global values (the gradient through each rank's share
            # is then exact, see `_entity_mean`).
            groups = global_sum(per_prompt.sum(0) / batch.global_entities, self.world)
            l_task, mean, var = task_loss_from_groups(groups, beta)
        parts = {"task_mean": mean.detach(), "task_var": var.detach()}
        loss = l_task
        if capl.entity is not None:
            if not batch.sharded:
                l1 = out.calibration_l1
                l_entity, attention = entity_loss(out.attn_map, targets, l1, self.cfg.lambda_l1)
            else:
                attention = self._entity_mean(seg_loss_probs(entity_attention_map(out.attn_map, targets), targets),
                                              batch, rows_per_entity=k)
                l1 = self._mean_of_rows(out.calibration_l1, batch)
                l_entity = attention + self.cfg.lambda_l1 * l1
            loss = loss + self.cfg.lambda_entity * l_entity
            parts["entity_attention"] = attention.detach()
            parts["calibration_l1"] = l1.detach()
        return loss, parts

    def lower_loss(self, batch: Batch, step: int, embeddings: Tensor | None = None, checkpoint: bool = False) -> Tensor:
        """SAM's objective (Eq. 3) with CaPL applied as it is: one of the K prompts per entity."""
        if embeddings is None:
            embeddings = self._image_embeddings(batch, grad=self.encoder_trainable, checkpoint=checkpoint)
        n, k, p = batch.labels.shape
        calibrated = self.model.calibrate_prompts(self._sparse(batch), batch.labels, batch.coords, embeddings,
                                                  batch.image_index)
        # Which of the K prompts each entity uses this step: pure function of (seed, step), drawn
        # for the global batch (a rank takes its entities' slice).
        draw = stream_rng(self.cfg.seed, "lower-k", step).integers(0, k, size=batch.global_entities)
        choice = torch.from_numpy(draw[batch.entity_offset : batch.entity_offset + n]).to(calibrated.device)
        chosen = calibrated[torch.arange(n, device=calibrated.device), choice]
        out = self.model.decode(embeddings, batch.image_index, chosen)
        if not batch.sharded:
            return sam_loss(out.low_res_logits[:, 0], batch.targets)
        return self._entity_mean(seg_loss_logits(out.low_res_logits[:, 0], batch.targets), batch)

    # ---- the two steps --------------------------------------------------------------------------

    def _next(self, stream: BatchStream, level: str, step: int) -> Batch:
        """The stream's next global batch (this rank's slice of it with several processes)."""
        batch = stream.next(shard=(self.world.rank, self.world.size) if self.world.distributed else None)
        if self.batch_hook is not None:
            batch = self.batch_hook(step, level, batch)
        self.images_seen += batch.global_images
        return batch.to(self.device)

    def _apply(
        self, loss: Tensor, optimizer: torch.optim.Optimizer, params: list[tuple[str, nn.Parameter]], clip, what: str
    ) -> float:
        """Backward, check, clip, step. Raises `_NonFinite` (before any update) on NaN/inf."""
        if not _finite(loss.detach()):
            raise _NonFinite(f"{what} loss", float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return self._step(optimizer, params, clip, what)

    def _step(self, optimizer: torch.optim.Optimizer, params: list[tuple[str, nn.Parameter]], clip, what: str) -> float:
        """Sum the level's (scaled) gradients over ranks, unscale, check, clip, step.

        Only `params` — the level being stepped — enter the all-reduce. It comes before unscaling,
        so an overflow on any rank is an overflow on every rank (GradScaler skips the step
        everywhere and the scales stay equal), and before clipping, so the clipped norm is the
        global batch's. Every decision below is taken on values that are equal on all ranks.
        """
        all_reduce_gradients([p for _, p in params], self.world)
        self.scaler.unscale_(optimizer)
        tensors = [p for _, p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(tensors, clip if clip is not None else math.inf)
        if not _finite(norm) and not self.scaler.is_enabled():
            raise _NonFinite(f"{what} gradient", float(norm))
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)  # free them; the other level must not see stale ones
        # A finite loss and gradient can still give non-finite weights (e.g. lr = inf); stop at
        # once, so that every checkpoint ever written holds finite weights.
        if not all(_finite(p.detach()) for _, p in params):
            raise _NonFinite(f"{what} update (parameters became non-finite)", float("nan"))
        return float(norm)

    def upper_step(self, batch: Batch) -> dict[str, float]:
        """One first-order CaPL step on `batch` with SAM frozen (image embeddings without graph)."""
        assert self.opt_upper is not None
        self._set_trainable(upper=True, lower=False)
        with self._autocast():
            with torch.no_grad():  # SAM is frozen here: the encoder keeps no graph
                embeddings = self._image_embeddings(batch, grad=False)
            loss, parts = self.upper_loss(batch, embeddings)
        norm = self._apply(loss, self.opt_upper, self.upper_params, self.cfg.capl_optim.grad_clip, "CaPL (upper)")
        return {"loss_upper": float(loss.detach()), "grad_norm_capl": norm, **{k: float(v) for k, v in parts.items()}}

    def upper_step_unrolled(self, batch: Batch, lower_batch: Batch, step: int) -> dict[str, float]:
        """CaPL step with the one-step unrolled hypergradient through the LoRA update.

        θ' = θ − η ∇θ L_lower(θ, φ) (η: the current LoRA learning rate; plain gradient step as
        the local model of the optimiser), then φ ← φ − ∇φ L_upper(φ, θ'(φ)), the total
        derivative including the path through θ'. No autocast (second-order terms in fp32).
        With several processes see `_unrolled_hypergradient_sharded`.
        """
        assert self.opt_upper is not None
        if batch.sharded:
            return self._upper_step_unrolled_sharded(batch, lower_batch, step)
        from torch.func import functional_call

        self._set_trainable(upper=True, lower=True)
        lower = self.lower_loss(lower_batch, step)
        if not _finite(lower.detach()):
            raise _NonFinite("LoRA (lower, unrolled) loss", float(lower.detach()))
        theta = [p for _, p in self.lower_params]
        grads = torch.autograd.grad(lower, theta, create_graph=True, allow_unused=True)
        eta = self.opt_lower.param_groups[0]["lr"]
        updated = {
            "model." + name: (p - eta * g if g is not None else p) for (name, p), g in zip(self.lower_params, grads)
        }
        objective = _Objective(self.model, lambda b: self.upper_loss(b))
        loss, parts = functional_call(objective, updated, (batch,), strict=False)
        norm = self._apply(loss, self.opt_upper, self.upper_params, self.cfg.capl_optim.grad_clip, "CaPL (upper)")
        for p in theta:  # the hypergradient also reached θ; the LoRA step computes its own
            p.grad = None
        self._set_trainable(upper=False, lower=True)
        return {"loss_upper": float(loss.detach()), "grad_norm_capl": norm, **{k: float(v) for k, v in parts.items()}}

    def _upper_step_unrolled_sharded(self, batch: Batch, lower_batch: Batch, step: int) -> dict[str, float]:
        """The unrolled CaPL step of a rank's slices, exact for the global batch.

        With the lower loss L = Σ_r L_r and the upper loss U = Σ_s U_s split over ranks, the
        hypergradient is ∂φU − η J(φ)ᵀ v with J = ∂(∇θ L)/∂φ = Σ_r J_r and v = ∂U/∂θ' = Σ_s v_s.
        Differentiating each rank's own graph (as the one-process code does) and summing would
        give Σ_r J_rᵀ v_r: the cross terms J_rᵀ v_s (r ≠ s) — how one rank's lower batch moves
        θ' for the other ranks' upper batches — would be lost, an error that grows with N. So:
        1. g_r = ∇θ L_r with its graph (create_graph); θ' = θ − η Σ_r g_r, the same on all ranks
           (the globally averaged inner step);
        2. U_r at θ' (θ' a detached leaf, `functional_call`): ∂φU_r and v_r; v = Σ_r v_r;
        3. each rank's hypergradient share ∂φU_r − η J_rᵀ v (a vector-Jacobian product through
           its g_r graph with the *global* v); `_step` sums the shares over ranks.
        The sum is exactly ∂φU − η Σ_r J_rᵀ v. Cost: as the one-process step plus one all-reduce
        of |θ| floats for g and one for v.
        """
        from torch.func import functional_call

        self._set_trainable(upper=True, lower=True)
        lower = self.lower_loss(lower_batch, step)
        if not _finite(lower.detach()):
            raise _NonFinite("LoRA (lower, unrolled) loss", float(lower.detach()))
        theta = [p for _, p in self.lower_params]
        phi = [p for _, p in self.upper_params]
        local_g = torch.autograd.grad(lower, theta, create_graph=True, allow_unused=True)
        global_g = sum_over_ranks([g.detach() if g is not None else None for g in local_g], theta, self.world)
        eta = self.opt_lower.param_groups[0]["lr"]
        theta_prime = [
            (p.detach() - eta * g if g is not None else p.detach().clone()).requires_grad_(True)
            for p, g in zip(theta, global_g)
        ]
        updated = {"model." + name: t for (name, _), t in zip(self.lower_params, theta_prime)}
        objective = _Objective(self.model, lambda b: self.upper_loss(b))
        loss, parts = functional_call(objective, updated, (batch,), strict=False)
        if not _finite(loss.detach()):
            raise _NonFinite("CaPL (upper) loss", float(loss.detach()))
        self.opt_upper.zero_grad(set_to_none=True)
        scaled = self.scaler.scale(loss)  # scaled shares, as `_apply` scales; `_step` unscales
        grads = torch.autograd.grad(scaled, phi + theta_prime, allow_unused=True)
        direct, v_local = grads[: len(phi)], grads[len(phi) :]
        v_global = sum_over_ranks(list(v_local), theta_prime, self.world)
        pairs = [(g, v) for g, v in zip(local_g, v_global) if g is not None and v is not None]
        cross = (
            torch.autograd.grad([g for g, _ in pairs], phi, grad_outputs=[v for _, v in pairs], allow_unused=True)
            if pairs
            else [None] * len(phi)
        )
        for p, d, c in zip(phi, direct, cross):
            if d is None and c is None:
                p.grad = None
            else:
                p.grad = (d if d is not None else torch.zeros_like(p)) - eta * (c if c is not None else 0.0)
        del local_g, lower  # the inner graph
        norm = self._step(self.opt_upper, self.upper_params, self.cfg.capl_optim.grad_clip, "CaPL (upper)")
        for p in theta:
            p.grad = None
        self._set_trainable(upper=False, lower=True)
        return {"loss_upper": float(loss.detach()), "grad_norm_capl": norm, **{k: float(v) for k, v in parts.items()}}

    def lower_step(self, batch: Batch, step: int) -> dict[str, float]:
        """One SAM step (LoRA, or all weights in full-finetune) on `batch` with CaPL frozen."""
        self._set_trainable(upper=False, lower=True)
        with self._autocast():
            loss = self.lower_loss(batch, step, checkpoint=True)
        norm = self._apply(loss, self.opt_lower, self.lower_params, self.cfg.sam_optim.grad_clip, "LoRA/SAM (lower)")
        return {"loss_lower": float(loss.detach()), "grad_norm_sam": norm}

    def train_step(self) -> dict[str, float]:
        """One iteration (upper then lower step in bilevel mode); returns its metrics."""
        step = self.step + 1
        metrics: dict[str, float] = {}
        lower_batch = None
        if self.upper_stream is not None:
            upper_batch = self._next(self.upper_stream, "upper", step)
            if self.cfg.hypergradient == "unrolled":
                lower_batch = self._next(self.lower_stream, "lower", step)
                metrics.update(self.upper_step_unrolled(upper_batch, lower_batch, step))
            else:
                metrics.update(self.upper_step(upper_batch))
            metrics["lr_capl"] = self.opt_upper.param_groups[0]["lr"]
            self.sched_upper.step()
        if lower_batch is None:
            lower_batch = self._next(self.lower_stream, "lower", step)
        metrics.update(self.lower_step(lower_batch, step))
        metrics["lr_sam"] = self.opt_lower.param_groups[0]["lr"]
        self.sched_lower.step()
        self.step = step
        return metrics

    # ---- state --------------------------------------------------------------------------------

    def _trainable_names(self) -> list[str]:
        return [n for n, _ in self.upper_params] + [n for n, _ in self.lower_params]

    def _rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate(),
        }
        if self.device.type == "cuda":  # this process's GPU only: resumable on a machine with other GPUs
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        cuda = state.get("cuda")
        if cuda is not None and self.device.type == "cuda":
            if isinstance(cuda, (list, tuple)):  # checkpoints of older versions: every GPU's state
                cuda = cuda[0] if cuda else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)

    def _light_state(self) -> dict[str, Any]:
        """What changes within an iteration besides weights: streams, RNGs, counters, CaPL level."""
        state = {
            "streams": {
                "lower": self.lower_stream.state_dict(),
                **({"upper": self.upper_stream.state_dict()} if self.upper_stream else {}),
            },
            "rng": self._rng_state(),
            "images_seen": self.images_seen,
        }
        if self.opt_upper is not None:  # CaPL steps first: keep its pre-iteration state (small)
            state["upper"] = {
                "params": [p.detach().clone() for _, p in self.upper_params],
                "optimizer": copy.deepcopy(self.opt_upper.state_dict()),
                "scheduler": self.sched_upper.state_dict(),
            }
        return state

    def state_dict(self, light: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A full checkpoint; `light` (a `_light_state` taken earlier) overrides the mid-step parts."""
        light = light or self._light_state()
        params = dict(self.model.named_parameters())
        trainable = {n: params[n].detach().cpu().clone() for n in self._trainable_names()}
        optimizers = {"lower": self.opt_lower.state_dict()}
        schedulers = {"lower": self.sched_lower.state_dict()}
        if self.opt_upper is not None:
            upper = light["upper"]
            for (name, _), value in zip(self.upper_params, upper["params"]):
                trainable[name] = value.detach().cpu().clone()
            optimizers["upper"] = upper["optimizer"]
            schedulers["upper"] = upper["scheduler"]
        return {
            "step": self.step,
            "fingerprint": self.fingerprint,
            "mode": self.cfg.mode,
            "trainable": trainable,
            "optimizers": optimizers,
            "schedulers": schedulers,
            "scaler": self.scaler.state_dict(),
            "streams": light["streams"],
            "rng": light["rng"],
            "images_seen": light["images_seen"],
            "curve": [dict(row) for row in self.curve],
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{source}: checkpoint belongs to another run configuration (fingerprint differs)")
        params = dict(self.model.named_parameters())
        missing = sorted(set(self._trainable_names()) - set(state["trainable"]))
        unexpected = sorted(set(state["trainable"]) - set(self._trainable_names()))
        if missing or unexpected:
            raise CheckpointError(f"{source}: trainable parameters differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value.to(params[name].device))
        self.opt_lower.load_state_dict(state["optimizers"]["lower"])
        self.sched_lower.load_state_dict(state["schedulers"]["lower"])
        if self.opt_upper is not None:
            self.opt_upper.load_state_dict(state["optimizers"]["upper"])
            self.sched_upper.load_state_dict(state["schedulers"]["upper"])
        self.scaler.load_state_dict(state["scaler"])
        self.lower_stream.load_state_dict(state["streams"]["lower"])
        if self.upper_stream is not None:
            self.upper_stream.load_state_dict(state["streams"]["upper"])
        self._set_rng_state(state["rng"])
        self.images_seen = int(state["images_seen"])
        self.curve = [dict(row) for row in state["curve"]]
        self.seconds = float(state.get("seconds", 0.0))
        self.step = int(state["step"])

    @property
    def checkpoint_dir(self) -> Path | None:
        if self._checkpoint_dir is not None:
            return self._checkpoint_dir
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    def save(self, light: Mapping[str, Any] | None = None) -> Path | None:
        """Write a checkpoint (rank 0; the other ranks hold the same state and write nothing)."""
        if self.checkpoint_dir is None or not self.world.is_main:
            return None
        path = save_checkpoint(self.checkpoint_dir, self.step, self.state_dict(light), keep=self.cfg.keep_checkpoints)
        logger.info("checkpoint: step %d -> %s", self.step, path)
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint of the checkpoint folder, when there is a compatible one.

        A checkpoint of another run (params, data, starting weights or code changed: see
        `cpcsam.training.checkpoint`) is not resumed: the folder is cleared and training starts
        over, as a new run of the stage should. With several processes rank 0 picks (and clears)
        and every rank loads the file it picked; the state in a checkpoint does not depend on the
        number of processes that wrote it.
        """
        if self.checkpoint_dir is None:
            return False
        path = latest_matching(self.checkpoint_dir, self.fingerprint) if self.world.is_main else None
        path = broadcast_object(path, self.world)
        if path is None:
            return False
        state = load_checkpoint(path)
        self.load_state_dict(state, source=str(path))
        barrier(self.world)  # nobody writes the next checkpoint before every rank has read this one
        logger.info("resumed from %s (step %d of %d)", path, self.step, self.cfg.steps)
        return True

    def _state_finite(self, light: Mapping[str, Any]) -> bool:
        """Whether the weights a checkpoint with `light` would hold are all finite."""
        upper = light["upper"]["params"] if "upper" in light else []
        return all(_finite(p.detach()) for _, p in self.lower_params) and all(_finite(p) for p in upper)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, resume: bool = True, progress: bool = True) -> dict[str, Any]:
        """Train to `cfg.steps` (resuming when possible); write curve/metrics; return the metrics."""
        from tqdm import tqdm

        if resume:
            self.resume()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train[{self.cfg.mode}]",
                   disable=not (progress and self.world.is_main))
        while self.step < self.cfg.steps:
            light = self._light_state()
            started = time.perf_counter()
            try:
                metrics = self.train_step()
            except _NonFinite as exc:
                self._stop_non_finite(exc, light)
            self.seconds += time.perf_counter() - started
            self.curve.append({"step": float(self.step), **metrics})
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                self.metric_logger.log_metrics(metrics, step=self.step)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save()
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k.startswith("loss")})
        bar.close()
        summary = self.summary()
        self.write_outputs(summary)
        return summary

    def _stop_non_finite(self, exc: _NonFinite, light: Mapping[str, Any]) -> None:
        step = self.step + 1
        saved: Path | None = None
        # The weights are those after step `self.step`; CaPL is rolled back by `light` when the
        # failure came after its update in the same iteration.
        if self._state_finite(light) and self.checkpoint_dir is not None:
            saved = self.save(light)
        elif self.checkpoint_dir is not None and self.world.is_main:
            saved = latest_checkpoint(self.checkpoint_dir)
        # Every rank stops here at the same step (they saw the same global values); rank 0 wrote.
        saved = broadcast_object(saved, self.world)
        where = f"last good checkpoint: {saved}" if saved else "no checkpoint was written (no out_dir)"
        raise NonFiniteLossError(
            f"step {step}: non-finite {exc.what} ({exc.value}); training stopped, {where}"
        ) from None

    def summary(self) -> dict[str, Any]:
        """Final metrics: means over the last 10 steps (or fewer) of every curve column."""
        tail = self.curve[-10:]
        final = {}
        for key in CURVE_FIELDS[1:]:
            values = [row[key] for row in tail if key in row]
            if values:
                final[key] = float(np.mean(values))
        return {
            "mode": self.cfg.mode,
            "hypergradient": self.cfg.hypergradient if self.upper_params else None,
            "capl_mode": self.model.mode,
            "steps": self.step,
            "images_seen": self.images_seen,
            "final": final,
            "first": {k: v for k, v in (self.curve[0].items() if self.curve else []) if k != "step"},
            "budget": {  # what makes variants comparable (wall time is in timing.json)
                "steps": self.cfg.steps,
                "images_per_step": self.images_seen / max(1, self.step),
                "trainable_parameters": sum(p.numel() for _, p in self.lower_params)
                + sum(p.numel() for _, p in self.upper_params),
            },
            "cached_embeddings": self.data.uses_embeddings,
        }

    def write_outputs(self, summary: Mapping[str, Any]) -> None:
        """`curve.csv`, `metrics.json` and `timing.json` (rank 0 alone)."""
        if self.out_dir is None or not self.world.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "curve.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in self.curve:
                writer.writerow({k: (int(v) if k == "step" else v) for k, v in row.items()})
        write_json_atomic(self.out_dir / "metrics.json", summary)
        # Wall time differs run to run: kept out of metrics.json, a DVC out that must be reproducible.
        timing_dir = self.checkpoint_dir or self.out_dir
        write_json_atomic(timing_dir / "timing.json",
                          {"seconds": self.seconds, "seconds_per_step": self.seconds / max(1, len(self.curve))})

"""Stand-in for SAM's pretraining: the small SAM trained from scratch, all weights.

No SA-1B weights can be downloaded here, so the `pretrain` stage trains a randomly initialised
small SAM on the base classes of the training split with random prompts derived from the ground
truth (box with noise, points, both: `GroundTruthPrompts`), single-mask output, with SAM's two
losses: the mask loss and the IoU-head MSE. The mask loss is class-balanced BCE + Dice
(`balanced_seg_loss_logits`): with plain BCE a from-scratch SAM first predicts background
everywhere and stays there for ~250 of the stage's few hundred steps (measured on the embedded
data, loss flat at ~1.0); balanced, it leaves that plateau at once. The result is written as a plain
segment-anything state dict (`Sam.state_dict()`), so everything downstream treats it exactly
like an official checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cpcsam.training.config import PretrainConfig, resolve_device
from cpcsam.training.data import BatchStream, GroundTruthPrompts, TrainingImages
from cpcsam.training.errors import NonFiniteLossError
from cpcsam.training.logging import MetricLogger, NullLogger
from cpcsam.training.losses import balanced_seg_loss_logits, iou_prediction_loss, mask_iou

logger = logging.getLogger(__name__)


def pretrain_sam(
    model_section: Mapping[str, Any],
    cfg: PretrainConfig,
    manifest: Any,
    out_path: str | Path | None,
    metric_logger: MetricLogger | None = None,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train SAM (random init, `model_section` sizes) for `cfg.steps`; returns (sam, metrics).

    Writes `sam.state_dict()` to `out_path` atomically when given.
    """
    from tqdm import tqdm

    from cpcsam.modeling import CPCSAM, build_sam

    metric_logger = metric_logger or NullLogger()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    sam = build_sam({**dict(model_section), "checkpoint": None})
    # CPCSAM in `fixed` mode is SAM itself (no CaPL parameters) with the same training entry
    # points as the trainer: the weights learn exactly the path that is fine-tuned later.
    model = CPCSAM(sam, {"mode": "fixed"}).to(device)
    model.train()
    params = [p for p in model.sam.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cfg.optim.lr_factor(s, cfg.steps))
    grid = model.embedding_size[0]
    data = TrainingImages(manifest, model.image_size, 4 * grid, cache_mb=cfg.cache_mb)
    prompts = GroundTruthPrompts(kind_probs=dict(cfg.kinds), sigma=cfg.sigma_box, slots=cfg.prompt_slots)
    stream = BatchStream(data, prompts, data.image_ids, cfg.batch_images, cfg.max_entities, cfg.seed, "pretrain")
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)
        if cfg.amp
        else None
    )
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in tqdm(range(1, cfg.steps + 1), desc="pretrain", disable=not progress):
        batch = stream.next().to(device)
        with autocast if autocast is not None else contextlib.nullcontext():
            embeddings = model.encode_images(batch.inputs)
            sparse = model.embed_prompts(batch.coords[:, 0], batch.labels[:, 0])
            out = model.decode(embeddings, batch.image_index, sparse)
            logits = out.low_res_logits[:, 0]
            mask_loss = balanced_seg_loss_logits(logits, batch.targets).mean()
            iou_loss = iou_prediction_loss(out.iou_pred, logits, batch.targets)
            loss = mask_loss + cfg.iou_loss_weight * iou_loss
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(f"pretrain step {step}: non-finite loss ({float(loss)}); nothing was written")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        row = {
            "step": step,
            "loss": float(loss.detach()),
            "mask_loss": float(mask_loss.detach()),
            "iou_loss": float(iou_loss.detach()),
            "mask_iou": float(mask_iou(logits.detach(), batch.targets).mean()),
            "grad_norm": float(grad_norm),
            "lr": optimizer.param_groups[0]["lr"],
        }
        curve.append(row)
        if step % cfg.log_every == 0 or step == cfg.steps:
            metric_logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
    seconds = time.perf_counter() - started
    model.eval()
    tail = curve[-10:]
    metrics = {
        "source": "pretrained-here",
        "steps": cfg.steps,
        "seconds": seconds,
        "first": {k: v for k, v in curve[0].items() if k != "step"},
        "final": {k: float(np.mean([r[k] for r in tail])) for k in ("loss", "mask_loss", "iou_loss", "mask_iou")},
        "train_images": len(data.image_ids),
    }
    if out_path is not None:
        save_sam_state_dict(model.sam, out_path)
    return model.sam, metrics


def save_sam_state_dict(sam: torch.nn.Module, path: str | Path) -> Path:
    """`torch.save(sam.state_dict())` (segment-anything's checkpoint format), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path

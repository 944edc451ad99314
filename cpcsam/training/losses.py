"""The losses of CPC-SAM (docs/METHOD.md Eq. 1–3) and of the stand-in pretraining.

Per-instance helpers return one value per mask (`[N]`) so that the callers can group them
(over the K prompt groups for Eq. 1, over entities for Eq. 2–3). Targets are float masks in
[0, 1] (area-averaged when resized, so small entities do not vanish) on the frame of the
prediction they are compared with.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Additive smoothing of the soft Dice: keeps the loss defined for empty targets and damps its
# gradient on tiny masks (the usual choice of SAM fine-tuning code).
DICE_SMOOTH = 1.0


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss per instance: `1 - (2 Σ p t + s) / (Σ p + Σ t + s)`, shape `[N]`."""
    p, t = _flat(probs), _flat(target)
    return 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def seg_loss_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_seg on logits: pixel-mean binary cross-entropy + soft Dice on the sigmoid, shape `[N]`."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(_flat(logits), _flat(target), reduction="none").mean(1)
    return bce + dice_loss(torch.sigmoid(logits), target)


def balanced_seg_loss_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE + soft Dice per instance, `[N]` (the stand-in pretraining's mask loss).

    BCE averaged separately over the (soft) foreground and background mass and the two halves
    averaged: an entity covering 1% of the frame weighs as much as its background. From scratch,
    plain BCE first collapses every mask to background (most pixels are background) and the
    model then needs hundreds of steps to escape; balancing removes that plateau.
    """
    logits = logits.float()
    t = _flat(target)
    ce_pos = F.binary_cross_entropy_with_logits(_flat(logits), torch.ones_like(t), reduction="none")
    ce_neg = F.binary_cross_entropy_with_logits(_flat(logits), torch.zeros_like(t), reduction="none")
    pos = (t * ce_pos).sum(1) / t.sum(1).clamp_min(1.0)
    neg = ((1 - t) * ce_neg).sum(1) / (1 - t).sum(1).clamp_min(1.0)
    return 0.5 * (pos + neg) + dice_loss(torch.sigmoid(logits), target)


def seg_loss_probs(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_seg on probabilities (the attention map of Eq. 2): BCE + soft Dice, shape `[N]`.

    `F.binary_cross_entropy` clamps its logarithms at -100, so maps that touch 0 or 1 stay finite.
    """
    probs = probs.float().clamp(0.0, 1.0)
    bce = F.binary_cross_entropy(_flat(probs), _flat(target), reduction="none").mean(1)
    return bce + dice_loss(probs, target)


def task_loss(per_prompt: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1 from the per-(entity, k) segmentation losses `[N, K]`.

    `L_seg,k` is the loss of prompt group D_k (mean over the batch's entities);
    `L_task = mean_k L_seg,k + beta * Var_k L_seg,k` (population variance over the K groups).
    Returns `(L_task, mean term, variance term)`.
    """
    if per_prompt.ndim != 2:
        raise ValueError(f"task_loss expects per-prompt losses [N, K], got shape {tuple(per_prompt.shape)}")
    return task_loss_from_groups(per_prompt.mean(0), beta)


def task_loss_from_groups(groups: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 1 from the K group losses `L_seg,k` `[K]` (the entity means; `task_loss` takes them
    over one batch, the distributed trainer over the global batch of all processes)."""
    mean = groups.mean()
    var = groups.var(unbiased=False) if groups.numel() > 1 else groups.new_zeros(())
    return mean + beta * var, mean, var


def entity_loss(
    attn_map: torch.Tensor, target: torch.Tensor, calibration_l1: torch.Tensor, lambda_l1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: `mean_j L_seg(A_j, y_j) + lambda_l1 * ||C - 1||_1`.

    `attn_map` `[N, h, w]` in [0, 1] is upsampled (bilinear) to the target's frame `[N, H, W]`
    ("averaged over heads, upsampled, scaled to [0, 1]"). Returns `(L_entity, attention term)`.
    """
    attention = seg_loss_probs(entity_attention_map(attn_map, target), target).mean()
    return attention + lambda_l1 * calibration_l1, attention


def entity_attention_map(attn_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`attn_map` `[N, h, w]` on the target's frame `[N, H, W]` (bilinear), as Eq. 2 compares them."""
    if attn_map.shape[-2:] != target.shape[-2:]:
        attn_map = F.interpolate(attn_map[:, None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return attn_map


def sam_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 3: `mean_j [CE + Dice]` of the decoder's masks (CE of a binary mask = BCE)."""
    return seg_loss_logits(logits, target).mean()


def mask_iou(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU per instance between the thresholded prediction and the binarised target, `[N]`."""
    pred = _flat(logits) > 0
    gt = _flat(target) >= threshold
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_prediction_loss(iou_pred: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's IoU head loss: MSE between the predicted IoU and the mask's actual IoU (no grad to masks)."""
    actual = mask_iou(logits.detach(), target)
    return F.mse_loss(iou_pred.reshape(-1).float(), actual)

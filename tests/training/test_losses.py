"""Losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cpcsam.training.losses import (
    balanced_seg_loss_logits,
    dice_loss,
    entity_loss,
    iou_prediction_loss,
    mask_iou,
    sam_loss,
    seg_loss_logits,
    seg_loss_probs,
    task_loss,
)


def test_dice_by_hand() -> None:
    probs = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # 2*(1 + 0.5) + 1 = 4 ; (1.5 + 2) + 1 = 4.5
    assert dice_loss(probs, target).item() == pytest.approx(1 - 4 / 4.5)
    assert dice_loss(probs, target, smooth=0.0).item() == pytest.approx(1 - 3 / 3.5)
    # an empty target with an empty prediction costs nothing
    assert dice_loss(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3)).item() == 0.0


def test_seg_loss_logits_by_hand() -> None:
    logits = torch.tensor([[[0.0, 2.0], [-2.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bce = (-math.log(0.5) - math.log(sig(2.0)) - math.log(1 - sig(-2.0)) - math.log(0.5)) / 4
    p = [0.5, sig(2.0), sig(-2.0), 0.5]
    dice = 1 - (2 * (p[0] + p[1]) + 1) / (sum(p) + 2 + 1)
    assert seg_loss_logits(logits, target).item() == pytest.approx(bce + dice, rel=1e-6)
    assert sam_loss(logits, target).item() == pytest.approx(bce + dice, rel=1e-6)


def test_seg_loss_probs_by_hand_and_finite_at_extremes() -> None:
    probs = torch.tensor([[[0.8, 0.2]]])
    target = torch.tensor([[[1.0, 0.0]]])
    bce = -math.log(0.8)
    dice = 1 - (2 * 0.8 + 1) / (1.0 + 1 + 1)
    assert seg_loss_probs(probs, target).item() == pytest.approx(bce + dice, rel=1e-6)
    hard = seg_loss_probs(torch.tensor([[[0.0, 1.0]]]), target)
    assert torch.isfinite(hard).all()


def test_task_loss_mean_and_population_variance() -> None:
    # 2 entities x 3 prompt groups: group losses are the column means 1, 2, 6
    per_prompt = torch.tensor([[1.0, 2.0, 5.0], [1.0, 2.0, 7.0]])
    total, mean, var = task_loss(per_prompt, beta=0.1)
    assert mean.item() == pytest.approx(3.0)
    assert var.item() == pytest.approx(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3)
    assert total.item() == pytest.approx(3.0 + 0.1 * 14 / 3)
    one_group, _, var1 = task_loss(torch.tensor([[2.0], [4.0]]), beta=0.1)
    assert var1.item() == 0.0 and one_group.item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        task_loss(torch.ones(3), beta=0.1)


def test_entity_loss_upsamples_attention_and_adds_l1() -> None:
    attn = torch.full((1, 2, 2), 0.5)
    target = torch.zeros(1, 4, 4)
    target[:, :2, :2] = 1.0
    total, attention = entity_loss(attn, target, torch.tensor(3.0), lambda_l1=0.01)
    # a constant map upsamples to itself: BCE = ln 2 everywhere
    dice = 1 - (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1)
    assert attention.item() == pytest.approx(math.log(2) + dice, rel=1e-6)
    assert total.item() == pytest.approx(attention.item() + 0.03, rel=1e-6)


def test_iou_loss_targets_the_actual_iou() -> None:
    logits = torch.tensor([[[5.0, 5.0], [-5.0, -5.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert mask_iou(logits, target).item() == pytest.approx(0.5)
    assert iou_prediction_loss(torch.tensor([[0.5]]), logits, target).item() == pytest.approx(0.0)
    assert iou_prediction_loss(torch.tensor([[1.0]]), logits, target).item() == pytest.approx(0.25)


def test_balanced_loss_weighs_foreground_and_background_equally() -> None:
    # 1 foreground pixel of 4; logits 0 everywhere: both halves cost ln 2
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    dice = 1 - (2 * 0.5 + 1) / (2.0 + 1 + 1)
    assert balanced_seg_loss_logits(logits, target).item() == pytest.approx(math.log(2) + dice, rel=1e-6)
    # an all-background prediction is punished by the foreground half alone, whatever its size
    background = torch.full((1, 2, 2), -20.0)
    half = balanced_seg_loss_logits(background, target).item() - dice_loss(torch.sigmoid(background), target).item()
    assert half == pytest.approx(0.5 * 20.0, rel=1e-3)

"""Metrics against hand-computed cases, including the empty ones."""

from __future__ import annotations

import numpy as np
import pytest

from cpcsam.evaluation.metrics import ClassScores, dice, iou, label_map, label_map_miou


def _mask(shape, *boxes):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_dice_and_iou_hand_computed():
    # P = 4 px, G = 6 px, overlap 2 px: Dice = 4/10, IoU = 2/8.
    pred = _mask((4, 4), (0, 2, 0, 2))
    gt = _mask((4, 4), (1, 3, 0, 3))
    assert int((pred & gt).sum()) == 2
    assert dice(pred, gt) == pytest.approx(0.4)
    assert iou(pred, gt) == pytest.approx(0.25)
    assert dice(gt, gt) == 1.0 and iou(gt, gt) == 1.0


def test_empty_cases():
    empty, full = np.zeros((3, 3), bool), np.ones((3, 3), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0  # nothing to find, nothing found
    assert dice(empty, full) == 0.0 and iou(empty, full) == 0.0  # empty prediction
    assert dice(full, empty) == 0.0 and iou(full, empty) == 0.0  # empty ground truth
    with pytest.raises(ValueError, match="shape"):
        dice(empty, np.zeros((2, 2), bool))


def test_label_map_threshold_and_argmax():
    logits = np.array([[[2.0, -1.0, 0.5]], [[1.0, -3.0, 3.0]]])  # 2 entities, 1x3 image
    assert label_map(logits).tolist() == [[0, -1, 1]]
    assert label_map(logits, threshold=2.5).tolist() == [[-1, -1, 1]]
    assert label_map(np.zeros((0, 2, 2))).tolist() == [[-1, -1], [-1, -1]]


def test_label_map_is_the_first_argmax_above_the_threshold_ties_and_infinities_included():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        logits = rng.integers(-3, 4, size=(n, 40, 50)).astype(np.float32)  # many ties
        logits[rng.random(logits.shape) < 0.05] = np.inf  # the references' hard masks are ±inf
        logits[rng.random(logits.shape) < 0.05] = -np.inf
        for threshold in (0.0, 1.5, -np.inf):
            expected = np.where(logits.max(axis=0) > threshold, logits.argmax(axis=0), -1)
            assert np.array_equal(label_map(logits, threshold), expected)


def test_label_map_miou_hand_computed():
    # Entity 0 wins the whole left half, entity 1 wins a right strip that is half its truth.
    logits = np.full((2, 2, 4), -5.0)
    logits[0, :, :2] = 3.0
    logits[1, :, 3:] = 1.0
    gt0 = _mask((2, 4), (0, 2, 0, 2))
    gt1 = _mask((2, 4), (0, 2, 2, 4))
    # IoU0 = 1, IoU1 = 2/4.
    assert label_map_miou(logits, [gt0, gt1]) == pytest.approx(0.75)
    assert label_map_miou(np.zeros((0, 2, 4)), []) is None


def test_class_scores_union_per_class_and_means():
    s = ClassScores()
    shape = (4, 4)
    a1 = _mask(shape, (0, 1, 0, 4))  # 4 px
    a2 = _mask(shape, (3, 4, 0, 4))  # 4 px
    b = _mask(shape, (1, 3, 0, 2))  # 4 px
    # Image 1: two entities of class "a", predicted perfect and empty -> union Dice 2*4/(4+8) = 2/3.
    # class "b" predicted perfectly -> 1.
    s.add_image([a1, np.zeros(shape, bool), b], [a1, a2, b], ["a", "a", "b"])
    # Image 2: only class "a", fully wrong -> 0. Class "b" absent: not averaged.
    s.add_image([a2], [a1], ["a"])
    out = s.summary(base=["a"], target=["b", "never_seen"])
    assert out["per_class"]["a"]["dice"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["per_class"]["a"]["iou"] == pytest.approx((0.5 + 0) / 2)
    assert out["per_class"]["a"]["n_images"] == 2
    assert out["per_class"]["b"]["n_images"] == 1
    assert out["base"]["dice"] == pytest.approx(1 / 3)
    assert out["target"]["dice"] == pytest.approx(1.0)  # "never_seen" has no image: left out, not 0
    assert out["overall"]["dice"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["label_map_miou"] is None


def test_class_with_empty_gt_is_not_averaged():
    s = ClassScores()
    s.add_class_score("x", np.ones((2, 2), bool), np.zeros((2, 2), bool))
    assert s.summary([], ["x"])["target"]["dice"] is None
